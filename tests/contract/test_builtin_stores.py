"""The store contract on the built-in Milvus store (Milvus Lite under tmp_path)."""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.testing.contracts import StoreContract


class TestMilvusStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = registry.create("store", "milvus", {"uri": str(tmp_path / "contract.db"), "collection": "contract"})
        yield store
        store.close()


@pytest.mark.extended  # the server path is also covered by test_milvus_server.py and the crash tests
class TestMilvusServerStore(StoreContract):
    """The same contract over a Milvus server (``milvus-lite server``): the network client path,
    asynchronous index builds, token caches under MMR_CACHE_DIR."""

    @pytest.fixture
    def store(self, milvus_server, tmp_path):
        store = registry.create("store", "milvus", {"uri": milvus_server, "collection": f"contract_{tmp_path.name}"})
        yield store
        store.drop()
        store.close()
