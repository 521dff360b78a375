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


@pytest.mark.slow  # a milvus-lite server, and an import per filled collection
class TestBulkImportStore(StoreContract):
    """The same contract over the bulk-import store (``mmr index --bulk-import``): rows go to Parquet
    files uploaded to a stand-in MinIO, and the stand-in import API loads them into a Milvus server
    (``milvus-lite server``) as Milvus' import would; reads and searches are the server's."""

    @pytest.fixture
    def store(self, milvus_server, tmp_path, monkeypatch):
        import io
        import json
        import tempfile

        import pyarrow.parquet as pq
        from pymilvus import MilvusClient

        from mm_retrieval.stages.stores.milvus_bulk import BulkImport, BulkImportConfig
        from tests.bulk_standins import S3, MilvusRest, serve

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # RemoteBulkWriter's staging folder
        client = MilvusClient(uri=milvus_server)
        s3 = serve(S3, objects={})

        def load(collection, keys):  # what Milvus' import job does with the uploaded files
            rows = [r for k in keys for r in pq.read_table(io.BytesIO(s3.objects[k])).to_pylist()]
            for r in rows:
                r["metadata"] = json.loads(r["metadata"])
            client.insert(collection, rows)
            rest.imported = len(rows)

        rest = serve(MilvusRest, requests=[], polls=0, importer=load, imported=0)
        rest.describe = lambda poll: {"state": "Completed", "progress": 100, "importedRows": rest.imported}
        milvus = registry.create("store", "milvus", {"uri": milvus_server, "collection": f"bulk_{tmp_path.name[-20:].replace('-', '_')}"})
        bulk = BulkImport(BulkImportConfig(endpoint=f"http://127.0.0.1:{s3.server_port}", rest_url=f"http://127.0.0.1:{rest.server_port}",
                                           rows_per_file=5, poll_s=0.01))
        store = bulk.wrap(milvus, progress=False)
        yield store
        store.close()
        milvus.drop()
        milvus.close()
        client.close()
        s3.shutdown()
        rest.shutdown()
