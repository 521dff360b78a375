"""The contracts on the second implementations shipped in :mod:`mm_retrieval.testing.fakes`: the
same tests as open_clip and Milvus pass on a hash encoder and an in-memory store, so the contracts
say what callers rely on rather than what the first implementation happens to do."""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.errors import InputError
from mm_retrieval.testing.contracts import EncoderContract, StoreContract
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore


class TestHashEncoder(EncoderContract):
    @pytest.fixture
    def encoder(self):
        return HashEncoder({"dim": 24})


class TestInMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = InMemoryStore({"collection": "contract", "cache_dir": str(tmp_path / "caches")})
        yield store
        store.close()

    def test_filters_speak_the_milvus_subset(self, store):
        rows = self.filled(store)
        def ids(expr):
            return sorted(r["id"] for r in store.iter_rows(("id",), filter=expr))

        def by(keep):
            return sorted(r["id"] for r in rows if keep(r))

        assert ids('metadata["i"] >= 3 and metadata["i"] < 6') == by(lambda r: 3 <= r["metadata"]["i"] < 6)
        assert ids('caption like "%ion 1%" or path like "/contract/img2%"') == by(
            lambda r: r["caption"] in ("caption 1", "caption 10", "caption 11") or r["path"] == "/contract/img2.png")
        assert ids('not (metadata["group"] in ["a"]) && has_image == true') == by(lambda r: r["metadata"]["group"] == "b" and r["has_image"])
        assert ids('metadata["missing"] == 1') == [] and ids('metadata["missing"] != 1') == []
        assert ids('metadata["i"] == "3"') == []  # another type: no match, no error
        for bad in ('metadata["i"] >', 'colour == "red"', 'caption like 3', 'path == "x" )'):
            with pytest.raises(InputError, match="invalid filter expression"):
                ids(bad)


def test_the_fakes_are_registered_stages():
    assert isinstance(registry.create("encoder", "hash", {"dim": 8}), HashEncoder)
    assert isinstance(registry.create("store", "memory", {"collection": "c"}), InMemoryStore)
