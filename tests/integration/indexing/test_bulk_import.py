"""`mmr index --bulk-import` / `--bulk-dir`: the Parquet files a bulk import loads.

Tested here, against a real `milvus-lite server` on 127.0.0.1: the files pymilvus' BulkWriter
writes for a collection have exactly its fields (names and types as ``describe_collection`` gives
them, in the Parquet types Milvus' import reads), and read back with pyarrow they hold the rows
given (ids, vectors to float32 precision, JSON metadata, captions); an index run through the CLI
writes the same rows a plain index run stores. Refused: a Milvus Lite file, a collection that
already holds rows, a MinIO endpoint that doesn't answer (before anything is encoded), and
without the ``bulk`` extra one message naming it.

The upload and import path runs against two small HTTP servers on 127.0.0.1 (tests/bulk_standins.py)
standing in for MinIO (objects kept in memory: HEAD/PUT/DELETE, what pymilvus' RemoteBulkWriter and minio's
client send) and for Milvus' REST import API (``/v2/vectordb/jobs/import/{list,create,describe}``,
answering with the documented fields): pymilvus' own clients make real requests to them. That
checks what this code sends and how it reacts (files streamed while rows come, the import request
naming exactly the uploaded keys, progress, completion, a failed job's reason, a bounded wait);
not tested here: what a real MinIO and Milvus do with them. Milvus Lite (the only Milvus this
machine can run) has neither object storage nor the import API; docker-compose.yml's Milvus
standalone + MinIO has both (docs/scaling.md, "Scaling it out", shows the run to try).
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.errors import InputError, StoreError
from mm_retrieval.stages.stores.milvus_bulk import BulkImport, BulkImportConfig
from tests.bulk_standins import S3, MilvusRest, serve
from tests.helpers import COLORS, TINY, free_port, make_image

pytestmark = pytest.mark.slow  # a milvus-lite server

PARQUET_TYPE = {"VARCHAR": pa.string(), "JSON": pa.string(), "BOOL": pa.bool_(), "INT64": pa.int64(), "FLOAT": pa.float32(),
                "FLOAT_VECTOR": pa.list_(pa.float32())}


def _pipe(uri, collection):
    return Pipeline(db=uri, collection=collection, encoder={**TINY, "workers": 0, "batch_size": 4})


def _read(files):
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def test_files_have_the_collections_schema_and_round_trip(milvus_server, tmp_path):
    pipe = _pipe(milvus_server, "bulk_rows")
    store = pipe.store
    store.ensure_collection(pipe.encoder.info())
    dim = pipe.encoder.dim
    rng = np.random.default_rng(0)
    rows = [{"id": f"{i:032x}", "vector": rng.standard_normal(dim).astype(np.float32), "path": f"/photos/é{i}.jpg",
             "content_hash": f"{i:064x}", "caption": f"a cat number {i} 🐈" if i % 2 else None,
             "metadata": {"year": 2000 + i, "tags": ["a", "ü"], "nested": {"k": i / 3}}, "file_size": 100 + i, "mtime_ns": 10**18 + i}
            for i in range(7)]
    for r in rows[1::2]:
        r["text_vector"] = rng.standard_normal(dim).astype(np.float32)
    rows[3].update(media_id="f" * 32, start=1.5, end=3.25, frame=2.375)  # a video segment (schema 3's media fields)
    bulk = BulkImport(BulkImportConfig(local_dir=str(tmp_path / "out"), rows_per_file=3))
    writer = bulk.wrap(store)
    writer.upsert(rows[:2])
    writer.upsert(rows[2:])  # crosses file boundaries: 3 + 3 + 1 rows
    writer.flush()
    assert bulk.state == "written" and bulk.rows == 7 and store.count() == 0  # nothing sent to Milvus

    assert [pq.ParquetFile(f).metadata.num_rows for f in bulk.files] == [3, 3, 1]
    # LocalBulkWriter's layout: numbered files in its own uuid folder, inside this run's folder under --bulk-dir
    assert [Path(f).name for f in bulk.files] == ["1.parquet", "2.parquet", "3.parquet"]
    assert {Path(f).parent for f in bulk.files} == {Path(bulk.folder)} and Path(bulk.folder).parent.parent == tmp_path / "out"
    fields = store.describe()["fields"]
    expected = pa.schema([(f["name"], PARQUET_TYPE[f["type"].name]) for f in fields])
    for f in bulk.files:
        assert pq.read_schema(f).remove_metadata() == expected  # every field, in order, nothing else

    back = _read(bulk.files)
    assert [b["id"] for b in back] == [r["id"] for r in rows]
    for r, b in zip(rows, back):
        np.testing.assert_array_equal(np.asarray(b["vector"], np.float32), r["vector"])
        if "text_vector" in r:
            assert b["has_text"] is True
            np.testing.assert_array_equal(np.asarray(b["text_vector"], np.float32), r["text_vector"])
        else:  # as upsert stores it: a zero vector that text searches skip
            assert b["has_text"] is False and not any(b["text_vector"]) and len(b["text_vector"]) == dim
        assert json.loads(b["metadata"]) == r["metadata"]
        assert b["caption"] == (r["caption"] or "") and b["path"] == r["path"] and b["has_image"] is True
        assert (b["content_hash"], b["file_size"], b["mtime_ns"]) == (r["content_hash"], r["file_size"], r["mtime_ns"])
        # schema 3's media fields, as upsert stores them: an image is its own media item, a segment keeps its times
        assert b["media_id"] == r.get("media_id", r["id"])
        assert (b["start"], b["end"], b["frame"]) == (r.get("start", 0.0), r.get("end", 0.0), r.get("frame", 0.0))
    command = bulk.command()
    assert "/v2/vectordb/jobs/import/create" in command and milvus_server in command
    assert json.loads(command.split("-d '", 1)[1].split("'", 1)[0])["files"] == [[p] for p in bulk.import_paths]


def test_index_with_bulk_dir_writes_what_plain_indexing_stores(milvus_server, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(photos / f"{name}.png", rgb, seed=i)
    (photos / "broken.png").write_bytes(b"not an image")
    table = tmp_path / "items.csv"
    names = list(COLORS)
    table.write_text("path,caption,year\n" + "".join(f"photos/{n}.png,a {n} picture,{2000 + i}\n" for i, n in enumerate(names[:5]))
                     + "photos/broken.png,broken,1999\n")

    ref = _pipe(milvus_server, "bulk_ref")
    ref_report = ref.index(table, progress=False)
    stored = {r["id"]: r for r in ref.store.iter_rows(["vector", "text_vector", "has_text", "caption", "metadata", "path"])}

    rc = main(["index", str(table), "--db", milvus_server, "--collection", "bulk_cli", "--model", "mmr-tiny", "--pretrained", "none",
               "--workers", "0", "--batch-size", "4", "--bulk-dir", str(tmp_path / "out"), "--json", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    doc = json.loads(out.out)
    assert doc["indexed"] == ref_report.indexed == 5
    assert [f["path"] for f in doc["failed"]] == [f.path for f in ref_report.failed] and len(doc["failed"]) == 1
    bulk = doc["bulk_import"]
    assert bulk["state"] == "written" and bulk["rows"] == 5 and "mc cp" in bulk["command"]

    back = {r["id"]: r for r in _read(bulk["files"])}
    assert set(back) == set(stored)
    for i, r in stored.items():
        b = back[i]
        assert np.allclose(b["vector"], r["vector"], atol=1e-5) and np.allclose(b["text_vector"], r["text_vector"], atol=1e-5)
        assert (b["has_text"], b["caption"], b["path"]) == (r["has_text"], r["caption"], r["path"])
        assert json.loads(b["metadata"]) == r["metadata"]
    assert Pipeline(db=milvus_server, collection="bulk_cli").store.count() == 0  # the files only: nothing imported


def test_refuses_a_lite_file_and_a_collection_with_rows(milvus_server, tmp_path, capsys):
    photos = tmp_path / "photos"
    make_image(photos / "red.png", COLORS["red"], seed=0)
    db = tmp_path / "lite.db"
    rc = main(["index", str(photos), "--db", str(db), "--model", "mmr-tiny", "--pretrained", "none", "--bulk-import"])
    err = capsys.readouterr().err
    assert rc == 2 and "Milvus Lite has no bulk import" in err and "--db http://HOST:19530" in err
    assert not db.exists()  # refused before anything was created

    full = _pipe(milvus_server, "bulk_full")
    full.index(photos, progress=False)
    with pytest.raises(InputError, match="first load.*already holds 1 rows.*new --collection"):
        full.index(photos, progress=False, bulk_import=BulkImport(BulkImportConfig(local_dir=str(tmp_path / "out"))))
    assert not (tmp_path / "out").exists()


def test_an_unreachable_minio_fails_before_encoding(milvus_server, image_folder):
    port = free_port()  # nothing listens here
    pipe = _pipe(milvus_server, "bulk_nominio")
    with pytest.raises(StoreError) as e:
        pipe.index(image_folder, bulk_import=BulkImport(BulkImportConfig(endpoint=f"http://127.0.0.1:{port}")))
    assert e.value.retriable and f"127.0.0.1:{port}" in str(e.value) and "--minio" in str(e.value)
    assert not pipe.store.exists() and pipe._encoder is None  # no collection, and the model was never loaded


def test_without_the_bulk_extra_one_message_names_it(tmp_path, capsys, monkeypatch):
    import pymilvus

    monkeypatch.delattr(pymilvus, "bulk_writer", raising=False)  # as if pymilvus[bulk-writer] were not installed
    monkeypatch.setitem(sys.modules, "pymilvus.bulk_writer", None)
    db = tmp_path / "lite.db"
    rc = main(["index", str(tmp_path), "--db", str(db), "--model", "mmr-tiny", "--pretrained", "none", "--bulk-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "mm-retrieval[bulk]"' in err and "--bulk-import" in err
    assert len(err.strip().splitlines()) == 1 and not db.exists() and not (tmp_path / "out").exists()


# ---- the upload + import path, against stand-ins for MinIO and Milvus' REST import API ----------
@pytest.fixture
def remote(milvus_server, tmp_path, monkeypatch):
    """A new collection on the milvus-lite server, a stand-in MinIO and REST API, and rows for it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # RemoteBulkWriter's staging folder: must be cleaned up
    s3, rest = serve(S3, objects={}), serve(MilvusRest, requests=[], polls=0, describe=None)
    pipe = _pipe(milvus_server, f"bulk_remote_{tmp_path.name[-12:].replace('-', '_')}")
    pipe.store.ensure_collection(pipe.encoder.info())
    rng = np.random.default_rng(1)
    rows = [{"id": f"{i:032x}", "vector": rng.standard_normal(pipe.encoder.dim).astype(np.float32), "path": f"/p/{i}.jpg",
             "metadata": {"n": i}} for i in range(5)]

    def config(**kw):
        return BulkImportConfig(endpoint=f"http://127.0.0.1:{s3.server_port}", rest_url=f"http://127.0.0.1:{rest.server_port}",
                                rows_per_file=2, poll_s=0.01, **kw)

    yield pipe.store, s3, rest, rows, config
    s3.shutdown()
    rest.shutdown()
    pipe.store.drop()


def test_upload_then_one_import_job_then_the_files_are_removed(remote, tmp_path, capsys):
    store, s3, rest, rows, config = remote
    rest.describe = lambda poll: {"state": "Importing", "progress": 40} if poll < 3 else {"state": "Completed", "progress": 100, "importedRows": 5}
    bulk = BulkImport(config())
    writer = bulk.wrap(store, progress=True)
    assert rest.requests == [("list", rest.requests[0][1])] and rest.requests[0][1]["collectionName"] == store.name  # preflight
    writer.upsert(rows)
    uploaded = dict(s3.objects)  # streamed while rows come: the two full files are in the bucket already
    assert len(uploaded) == 2 and all(k.startswith(bulk.folder + "/") for k in uploaded)
    writer.flush()

    assert bulk.state == "completed" and bulk.rows == 5 and bulk.imported_rows == 5 and bulk.job_ids == ["4242"]
    assert len(bulk.files) == 3 and set(uploaded) < set(bulk.files)
    (verb, create), = [r for r in rest.requests if r[0] == "create"]
    assert create["collectionName"] == store.name and create["files"] == [[k] for k in bulk.files]  # keys in Milvus' bucket
    assert [b["jobId"] for v, b in rest.requests if v == "describe"] == ["4242"] * 3
    assert s3.objects == {}  # imported: removed from the bucket
    assert list(tmp_path.glob("mmr-bulk-*")) == []  # and the local staging folder is gone
    back = pa.concat_tables([pq.read_table(pa.BufferReader(uploaded[k])) for k in bulk.files[:2]]).to_pylist()
    assert [b["id"] for b in back] == [r["id"] for r in rows[:4]] and [json.loads(b["metadata"]) for b in back] == [r["metadata"] for r in rows[:4]]
    np.testing.assert_array_equal(np.asarray(back[3]["vector"], np.float32), rows[3]["vector"])
    err = capsys.readouterr().err
    assert "bulk import" in err and "100/100" in err  # the progress bar on stderr


def test_a_failed_job_reports_milvus_reason_and_keeps_the_files(remote):
    store, s3, rest, rows, config = remote
    rest.describe = lambda poll: {"state": "Failed", "progress": 0, "reason": "the field 'vector' in 1.parquet has dim 3"}
    bulk = BulkImport(config())
    writer = bulk.wrap(store, progress=False)
    writer.upsert(rows)
    with pytest.raises(StoreError, match=r"job 4242 .* failed: the field 'vector' in 1\.parquet has dim 3\. Nothing .* stay under a-bucket/"):
        writer.flush()
    writer.close()
    assert bulk.state == "failed" and set(s3.objects) == set(bulk.files) and len(bulk.files) == 3  # kept for inspection

    rest.describe = lambda poll: {"state": "Importing", "progress": 10}  # never ends: the wait is bounded
    bulk = BulkImport(config(timeout_s=0.2))
    writer = bulk.wrap(store, progress=False)
    writer.upsert(rows[:1])
    with pytest.raises(StoreError, match="still running after 0 s; they go on on the server") as e:
        writer.flush()
    assert e.value.retriable and bulk.state == "importing"
