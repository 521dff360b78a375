"""Bulk import: the first load of millions of rows into a Milvus server, without an upsert per batch.

``mmr index SOURCE --db http://HOST:19530 --bulk-import`` (``Pipeline.index(..., bulk_import=BulkImport())``)
runs the index as usual (decode, encode, token cache; with ``--ray`` too) but the rows do not go
to Milvus batch by batch: :class:`BulkImportStore` sits between the indexer and the
:class:`~mm_retrieval.stages.stores.milvus.MilvusStore` and hands them to pymilvus' own bulk
import pieces (the optional extra ``pip install "mm-retrieval[bulk]"``, i.e. ``pymilvus[bulk-writer]``):

1. the collection's schema is read back from Milvus (``describe_collection`` ->
   ``CollectionSchema.construct_from_dict``), so the files follow whatever fields it has;
2. every row (cleaned exactly as :meth:`MilvusStore.upsert` would send it) goes to a
   ``RemoteBulkWriter`` (``BulkFileType.PARQUET``) that writes Parquet files in that schema and
   uploads each one into the object store Milvus reads (MinIO in docker-compose.yml, or S3),
   each run under its own folder; with ``local_dir`` (``--bulk-dir DIR``) a ``LocalBulkWriter``
   only writes them there and :meth:`BulkImport.command` says how to upload and import them;
3. at the end of the run (the indexer's ``flush``) ``bulk_import`` submits one import job for all
   files, ``get_import_progress`` is polled with progress on stderr until it completes (bounded
   by ``timeout_s``), and the uploaded files are removed.

How the writers are driven, and why: files are closed by this module's own synchronous
``commit()`` once a file holds ``rows_per_file`` rows or ``file_bytes`` bytes (as BulkWriter
counts them), never by BulkWriter's automatic asynchronous commit: that one runs in a thread whose
errors (a full disk, a failed upload) would be lost, and it can race the reset of the buffer
counters it reads. The thread that writes/uploads a file is joined at each commit and its error,
if any, kept and raised here (``_Capture``), so a file that didn't make it stops the run.

Limits, on purpose:

* **A Milvus server only**: Milvus Lite has no import (:func:`check_target` refuses a ``.db`` file).
* **A first load only** (a new or empty collection): an import appends rows, it does not replace
  rows with the same id as an upsert does, so importing into a collection that already holds
  some could store an item twice. Later runs (new files, changes) use plain ``mmr index``/``mmr sync``.
* Rows only reach the collection when the import job completes, at the end of the run: a run
  killed before then leaves an empty collection (and token-cache rows that the next run, with or
  without ``--bulk-import``, keeps or drops as it re-encodes). Nothing is half-imported: a
  failed job is reported with Milvus' reason and imports nothing; its files are kept.
* Memory: BulkWriter buffers a file's rows as Python lists until the file is written (about 8x
  ``file_bytes`` for float vectors), hence the 128 MB default per file.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ...errors import InputError, MissingDependencyError, StoreError
from ...progress import progress_bar
from ...types import Hit
from ..base import Store
from .milvus import MilvusStore, clean_row

log = logging.getLogger(__name__)

MB = 2**20
MAX_FILES_PER_JOB = 1024  # Milvus' cap on files in one import request (dataCoord.import.maxFilesPerImportReq)


def require_bulk_writer() -> Any:
    """``pymilvus.bulk_writer`` (BulkWriter, bulk_import), or MissingDependencyError naming the extra."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from pymilvus import bulk_writer
    except ImportError as e:  # pymilvus raises ModuleNotFoundError naming the missing packages
        raise MissingDependencyError("pymilvus[bulk-writer]", "bulk", "mmr index --bulk-import / --bulk-dir") from e
    if not handlers and root.handlers:  # its endpoint_resolver calls logging.basicConfig(INFO) on import: undo that
        for h in root.handlers[:]:
            root.removeHandler(h)
        root.setLevel(level)
    quiet = logging.getLogger("pymilvus.bulk_writer")  # pymilvus logs every file's flush at INFO on its own handler
    if quiet.level == logging.INFO and root.getEffectiveLevel() > logging.INFO:  # (-v keeps them)
        quiet.setLevel(logging.WARNING)
    return bulk_writer


@dataclass(frozen=True)
class BulkImportConfig:
    """Where the Parquet files go and how the import is run. Defaults fit docker-compose.yml
    (MinIO published on 127.0.0.1:9000, Milvus' bucket ``a-bucket``, keys ``minioadmin``)."""

    local_dir: str | None = None  # only write the files here (no upload, no import); see BulkImport.command()
    endpoint: str = "http://localhost:9000"  # the MinIO/S3 endpoint Milvus reads from (in compose's network: http://minio:9000)
    bucket: str = "a-bucket"  # Milvus' own bucket (milvus.yaml minio.bucketName): import paths are relative to it
    access_key: str = "minioadmin"
    secret_key: str = "minioadmin"
    region: str = "us-east-1"  # MinIO ignores it; S3 needs the bucket's
    prefix: str = "mmr-import"  # folder in the bucket; each run writes into its own sub-folder
    rows_per_file: int = 200_000  # a file is closed at this many rows ...
    file_bytes: int = 128 * MB  # ... or once its rows hold this many bytes (BulkWriter's chunk_size; ~32k rows of 2 x 512-d)
    poll_s: float = 2.0  # seconds between import progress requests
    timeout_s: float = 6 * 3600.0  # give up waiting (the job keeps running on the server) after this long
    keep_files: bool = False  # leave the uploaded files in the bucket after a completed import
    rest_url: str | None = None  # Milvus' REST API (import jobs) when not on the --db URI (milvus.yaml proxy.http.port)


@dataclass
class BulkImport:
    """A bulk import for one index run: its settings, and afterwards what it did.

    Pass it to :meth:`Pipeline.index` (``bulk_import=``); after the run ``files`` lists the Parquet
    files written (local paths with ``local_dir``, else bucket keys), ``rows`` how many rows they
    hold, ``job_ids``/``state`` the import job(s), and :meth:`command` (``local_dir`` only) how to
    import the files by hand.
    """

    config: BulkImportConfig = field(default_factory=BulkImportConfig)
    files: list[str] = field(default_factory=list)
    rows: int = 0
    job_ids: list[str] = field(default_factory=list)
    state: str = "not started"  # written | uploaded | importing | completed | failed | aborted
    imported_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    collection: str = ""
    uri: str = ""
    folder: str = ""  # this run's folder: local (local_dir) or the bucket key prefix

    def wrap(self, store: Any, *, progress: bool | None = None) -> "BulkImportStore":
        """The store an index run writes through (see :class:`BulkImportStore`); needs the ``bulk``
        extra, refuses a Milvus Lite file and a collection that already holds rows, and (unless
        ``local_dir``) checks MinIO and Milvus' import API answer before anything is encoded."""
        return BulkImportStore(store, self, progress=progress)

    @property
    def import_paths(self) -> list[str]:
        """The files as Milvus' import request names them: keys in the bucket (for ``local_dir``,
        where :meth:`command` uploads them)."""
        cfg = self.config
        if cfg.local_dir is None:
            return list(self.files)
        return [f"{self._upload_prefix()}/{Path(f).name}" for f in self.files]

    def _upload_prefix(self) -> str:
        """``local_dir`` only: the bucket folder :meth:`command` copies this run's folder into."""
        root = Path(self.config.local_dir or ".").expanduser().resolve()
        try:
            rel = Path(self.folder).relative_to(root).as_posix()
        except ValueError:
            rel = Path(self.folder).name
        return f"{self.config.prefix}/{rel}"

    @property
    def api_url(self) -> str:
        """Where the import jobs are submitted: Milvus' REST API (by default on the ``--db`` URI)."""
        return (self.config.rest_url or self.uri).rstrip("/")

    def command(self) -> str:
        """For ``local_dir``: shell commands that upload the files into Milvus' bucket (MinIO's
        ``mc``) and start the import (Milvus' REST API, the call pymilvus' ``bulk_import`` makes);
        then ``mmr index`` without ``--bulk-import`` checks the collection against the source (it
        re-encodes nothing)."""
        cfg = self.config
        body = json.dumps({"collectionName": self.collection, "files": [[p] for p in self.import_paths[:MAX_FILES_PER_JOB]]})
        more = "" if len(self.files) <= MAX_FILES_PER_JOB else f"\n# ... and one more request per {MAX_FILES_PER_JOB} further files"
        return (
            f"mc alias set mmrminio {cfg.endpoint} {cfg.access_key} YOUR_SECRET_KEY\n"
            f"mc cp --recursive {self.folder}/ mmrminio/{cfg.bucket}/{self._upload_prefix()}/\n"
            f"curl -sS -X POST {self.api_url}/v2/vectordb/jobs/import/create -H 'Content-Type: application/json' "
            f"-d '{body}'{more}\n"
            f"# progress: curl -sS -X POST {self.api_url}/v2/vectordb/jobs/import/describe "
            "-H 'Content-Type: application/json' -d '{\"jobId\": \"JOB_ID\"}'"
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"state": self.state, "rows": self.rows, "files": list(self.files), "folder": self.folder,
               "job_ids": list(self.job_ids), "imported_rows": self.imported_rows,
               "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if self.config.local_dir is not None:
            out["command"] = self.command()
        return out


def check_target(store: Any) -> None:
    """Refuse what bulk import can't load: anything but a Milvus server collection that is new or empty."""
    if not isinstance(store, MilvusStore):
        raise InputError(f"--bulk-import loads a Milvus server collection (store/milvus); the configured store is {store.label}")
    if store.local_path is not None:
        raise InputError(
            f"--bulk-import needs a Milvus server (--db http://HOST:19530, e.g. docker-compose.yml's), not the Milvus Lite file "
            f"{store.config.uri}: Milvus Lite has no bulk import. Drop --bulk-import (plain indexing writes to Lite in batches)"
        )
    n = store.count()
    if n:
        raise InputError(
            f"--bulk-import is for a first load, but collection {store.name!r} at {store.config.uri} already holds {n} rows: an "
            "import appends rows without replacing those with the same id (as indexing's upserts do), so items could be stored "
            "twice. Index into it without --bulk-import (only new files are encoded), or bulk-import into a new --collection"
        )


def collection_schema(store: MilvusStore) -> Any:
    """The collection's ``CollectionSchema`` as Milvus describes it: what BulkWriter writes files for."""
    from pymilvus import CollectionSchema

    return CollectionSchema.construct_from_dict(store.describe())


class BulkImportStore(Store):
    """The store an index run writes through for a bulk import: ``upsert`` appends the rows to
    pymilvus' BulkWriter (Parquet files in the collection's schema), ``flush`` (the end of the
    run) closes the last file and imports them all (or, with ``local_dir``, stops there);
    everything else (reads, creating the collection, the token-cache folder) is the wrapped
    MilvusStore's.

    A bulk import is a first load: once its import has completed (the first ``flush`` that
    imported), the collection holds rows and later writes are the wrapped store's upserts, which
    replace rows with the same id as an import would not. Rows are searchable once imported: a
    run's rows at its end, as the module docstring says. With ``local_dir`` nothing is imported,
    so nothing written reaches the collection."""

    stage_kind, stage_name = "store", "milvus_bulk"

    def __init__(self, store: MilvusStore, bulk: BulkImport, *, progress: bool | None = None):
        super().__init__()
        self._bw = require_bulk_writer()  # the extra first: nothing else is worth checking without it
        check_target(store)
        self._store = store
        self._loaded = False  # the import completed: later writes are plain upserts
        self._bulk = bulk
        self._progress = progress
        self._writer: Any = None
        self._tmp: str | None = None  # RemoteBulkWriter's local staging folder
        self._pending: set[str] = set()  # ids written to files, not imported yet
        cfg = bulk.config
        bulk.collection, bulk.uri = store.name, store.config.uri
        self._job = f"{store.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        if cfg.local_dir is not None:
            bulk.folder = str(Path(cfg.local_dir).expanduser().resolve() / self._job)
            self._job_dir = Path(bulk.folder)  # BulkWriter writes into a uuid folder inside it
            self._minio = None
        else:
            bulk.folder = f"{cfg.prefix}/{self._job}"
            self._minio, self._connect, probe = _minio(cfg, self._bw)
            self._preflight(probe)

    # ---- the collection, reads and search: the wrapped store's ----------------------------
    search_options = MilvusStore.search_options

    @property
    def name(self) -> str:
        return self._store.name

    @property
    def metric(self) -> str:
        return self._store.metric

    @property
    def location(self) -> str | None:
        return self._store.location

    @property
    def local_path(self) -> Path | None:
        return self._store.local_path

    def cache_dir(self) -> Path:
        return self._store.cache_dir()

    def exists(self) -> bool:
        return self._store.exists()

    def require(self) -> None:
        self._store.require()

    def encoder_info(self) -> dict[str, Any] | None:
        return self._store.encoder_info()

    def check_compatible(self, encoder_info: dict[str, Any]) -> None:
        self._store.check_compatible(encoder_info)

    def check_filter(self, filter: str) -> None:
        self._store.check_filter(filter)

    def ensure_collection(self, encoder_info: dict[str, Any]) -> None:
        self._store.ensure_collection(encoder_info)

    def drop(self) -> None:
        self.close()  # files of rows that were not imported: they would go into no collection
        self._store.drop()
        self._loaded = False  # a new collection gets a first load again

    def count(self) -> int:
        return self._store.count()

    def count_with_text(self) -> int:
        return self._store.count_with_text()

    def has_text_vectors(self) -> bool:
        return self._store.has_text_vectors()

    def has_media_fields(self) -> bool:
        return self._store.has_media_fields()

    def get(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        return self._store.get(ids, fields)

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), filter: str = "") -> Iterator[dict[str, Any]]:
        return self._store.iter_rows(fields, filter)

    def query(self, filter: str, fields: Sequence[str], limit: int) -> list[dict[str, Any]]:
        return self._store.query(filter, fields, limit)

    def search(self, vectors: np.ndarray, limit: int, filter: str = "", *, mode: str = "image",
               group_by_media: bool = False, min_score: float | None = None) -> list[list[Hit]]:
        return self._store.search(vectors, limit, filter, mode=mode, group_by_media=group_by_media, min_score=min_score)

    def hybrid_search(self, vector: np.ndarray, limit: int, filter: str = "", *, ranker: str = "rrf",
                      weights: tuple[float, float] = (0.5, 0.5), rrf_k: int = 60, images_only: bool = False,
                      group_by_media: bool = False, min_score: float | None = None) -> list[Hit]:
        return self._store.hybrid_search(vector, limit, filter, ranker=ranker, weights=weights, rrf_k=rrf_k,
                                         images_only=images_only, group_by_media=group_by_media, min_score=min_score)

    def neighbour_ids(self, vectors: np.ndarray, limit: int, filter: str = "") -> list[list[tuple[str, float]]]:
        return self._store.neighbour_ids(vectors, limit, filter)

    def record_video_fact(self, holds: bool) -> None:
        self._store.record_video_fact(holds)

    # ---- writes ----------------------------------------------------------------------------
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows (as :meth:`MilvusStore.upsert` takes them) to the import files; after the
        import, upsert them (see the class docstring)."""
        if not rows:
            return
        if self._loaded:
            self._store.upsert(rows)
            return
        if self._writer is None:
            self._open()
        if not self._media and any(r.get("media_id") not in (None, r["id"]) for r in rows):
            raise InputError(f"collection {self._store.name!r} has no media fields (it was created before videos could be indexed), "
                             "so video segments can't be stored in it: bulk-import into a new --collection")
        from pymilvus.exceptions import MilvusException

        cfg, writer = self._bulk.config, self._writer
        t = time.perf_counter()
        for r in rows:
            row = clean_row(r, self._media)  # the values upsert would send (defaults, caption cap, ...)
            for name in self._vectors:  # as float32 arrays: BulkWriter checks a list element by element (4x slower)
                row[name] = np.asarray(row[name], dtype=np.float32)
            for name, limit in self._varchar.items():  # Milvus counts bytes; BulkWriter's check counts characters
                if isinstance(row.get(name), str) and len(row[name].encode("utf-8")) > limit:
                    raise StoreError(f"bulk import: row {r['id']}: {name!r} is longer than the field's {limit} bytes")
            try:
                writer.append_row(row)
            except MilvusException as e:
                raise StoreError(f"bulk import into {self._store.name!r}: row {r['id']} does not fit the collection's schema: "
                                 f"{_short(e)} (a collection made by another version of mm_retrieval?); index without "
                                 "--bulk-import, or into a new --collection") from e
            if writer.buffer_row_count >= cfg.rows_per_file or writer.buffer_size >= cfg.file_bytes:
                self._commit()
        self._bulk.seconds["write"] = self._bulk.seconds.get("write", 0.0) + time.perf_counter() - t
        self._pending.update(r["id"] for r in rows)

    def delete(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if self._pending.intersection(ids):  # a first load never replaces its own rows (one path, one row)
            raise StoreError(f"bulk import into {self._store.name!r}: rows already written to the import files can't be deleted "
                             "before they are imported; index without --bulk-import")
        self._store.delete(ids)

    def flush(self) -> None:
        """Close the last file; then (unless ``local_dir``) import them all, wait, and flush the collection."""
        bulk = self._bulk
        if self._loaded:  # the import is done: later rows were upserted
            self._store.flush()
            return
        if self._writer is not None:
            t = time.perf_counter()
            self._commit()
            bulk.files = [f for batch in self._writer.batch_files for f in batch]
            self._release()
            bulk.seconds["write"] = bulk.seconds.get("write", 0.0) + time.perf_counter() - t
        if not bulk.files:
            bulk.state = "nothing to import"
            self._store.flush()
            return
        if bulk.config.local_dir is not None:
            bulk.state = "written"
            log.info("bulk import: %d rows in %d Parquet files under %s; import them with:\n%s", bulk.rows, len(bulk.files),
                     bulk.folder, bulk.command())
            self._store.flush()
            return
        bulk.state = "uploaded"
        t = time.perf_counter()
        self._import()
        bulk.seconds["import"] = time.perf_counter() - t
        self._pending.clear()
        self._loaded = True
        if not bulk.config.keep_files:
            self._remove_uploaded(bulk.files)
        self._store.refresh()  # imported segments: let the next read reload and wait for their index
        self._store.flush()

    def close(self) -> None:
        """End of the run: files of a run that never reached :meth:`flush` (an error, a kill) are
        partial; remove them."""
        if self._writer is None:
            return
        uploaded = [f for batch in self._writer.batch_files for f in batch]
        self._release()
        self._bulk.state = "aborted"
        if self._bulk.config.local_dir is not None:
            shutil.rmtree(self._job_dir, ignore_errors=True)
        else:
            self._remove_uploaded(uploaded)

    def _open(self) -> None:
        """The BulkWriter for this run, on the collection's schema (read once the collection exists)."""
        bulk, cfg, bw = self._bulk, self._bulk.config, self._bw
        t = time.perf_counter()
        schema = collection_schema(self._store)
        names = {f.name for f in schema.fields}
        self._media = "media_id" in names
        self._varchar = {f.name: int(f.params["max_length"]) for f in schema.fields
                         if f.dtype.name == "VARCHAR" and not f.is_function_output and f.params.get("max_length")}
        self._vectors = [f.name for f in schema.fields if f.dtype.name == "FLOAT_VECTOR" and not f.is_function_output]
        Local, Remote = _writer_classes(bw)
        never = 2**62  # BulkWriter's own (asynchronous) commit never fires: _commit closes the files
        try:
            if cfg.local_dir is not None:
                Path(bulk.folder).mkdir(parents=True, exist_ok=True)
                self._writer = Local(schema=schema, local_path=bulk.folder, chunk_size=never, file_type=bw.BulkFileType.PARQUET)
            else:
                self._tmp = tempfile.mkdtemp(prefix="mmr-bulk-")
                self._writer = Remote(schema=schema, remote_path=bulk.folder, connect_param=self._connect, chunk_size=never,
                                      file_type=bw.BulkFileType.PARQUET, local_path=self._tmp)
        except OSError as e:
            raise StoreError(f"bulk import: cannot create the folder for the import files: {_short(e)}", retriable=True) from e
        bulk.folder = str(self._writer.data_path).strip("/") if cfg.local_dir is None else str(self._writer.data_path)
        bulk.seconds["schema"] = time.perf_counter() - t

    def _commit(self) -> None:
        """Write (and, remote, upload) the buffered rows as one file, now; raise what went wrong."""
        writer = self._writer
        rows, before = writer.buffer_row_count, len(writer.batch_files)
        if not rows:
            return
        writer.commit()  # synchronous: joins the thread that writes the file
        error, writer.error = writer.error, None
        where = "uploading" if self._bulk.config.local_dir is None else "writing"
        if error is not None:
            raise StoreError(f"bulk import: {where} a Parquet file under {self._bulk.folder} failed: {_short(error)}",
                             retriable=True) from error
        if len(writer.batch_files) == before:
            raise StoreError(f"bulk import: {where} a Parquet file of {rows} rows under {self._bulk.folder} failed (see the log above)",
                             retriable=True)
        self._bulk.rows += rows

    def _release(self) -> None:
        """Let go of the writer: its threads joined, its empty folders and the staging folder removed."""
        writer, self._writer = self._writer, None
        try:
            writer.__exit__(None, None, None)
        except OSError:
            pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _remove_uploaded(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                self._minio.remove_object(self._bulk.config.bucket, key)
            except Exception as e:  # the rows are in (or the run failed anyway); leftover files only cost space
                log.warning("bulk import: could not remove %s/%s: %s", self._bulk.config.bucket, key, _short(e))

    # ---- Milvus' import API (pymilvus.bulk_writer.bulk_import) ------------------------------
    def _preflight(self, probe: Any) -> None:
        """Before hours of encoding: the bucket is reachable with these keys (one try, ``probe``),
        and the server has the import API."""
        cfg = self._bulk.config
        try:
            found = probe.bucket_exists(cfg.bucket)
        except Exception as e:  # urllib3's MaxRetryError, minio's S3Error (keys), ...
            raise StoreError(
                f"bulk import: cannot reach bucket {cfg.bucket!r} at {cfg.endpoint}: {_short(e)}. Check --minio (the object store "
                "your Milvus server uses; docker-compose.yml publishes MinIO on 127.0.0.1:9000) and the access/secret keys",
                retriable=True,
            ) from e
        if not found:
            raise InputError(f"bulk import: bucket {cfg.bucket!r} does not exist at {cfg.endpoint}; pass the bucket your Milvus "
                             "server stores its data in (--minio-bucket; milvus.yaml minio.bucketName, a-bucket by default)")
        self._api(self._bw.list_import_jobs, collection_name=self._store.name)

    def _api(self, fn: Any, **kwargs: Any) -> dict[str, Any]:
        """One call of pymilvus' import API (a POST to the server's REST port): its ``data``, or a StoreError."""
        from pymilvus.exceptions import MilvusException

        store = self._store
        url = self._bulk.api_url
        try:
            resp = fn(url=url, api_key=store.config.token or "", timeout=store.config.timeout, **kwargs)
            doc = resp.json()
        except MilvusException as e:
            msg = _short(e)
            if "Failed to post url" in msg:  # no answer, or not 200: no server or no REST API there
                raise StoreError(f"bulk import: Milvus' import API at {url} did not answer: {msg}. It needs a Milvus server "
                                 "(2.4 or later) whose REST API is on the --db port", retriable="status code" not in msg) from e
            raise StoreError(f"bulk import: Milvus at {url} refused the request: {msg}") from e
        except ValueError as e:  # not JSON
            raise StoreError(f"bulk import: Milvus' import API at {url} answered something that isn't JSON: {_short(e)}") from e
        return doc.get("data") or {}

    def _import(self) -> None:
        bulk, cfg, bw = self._bulk, self._bulk.config, self._bw
        paths = bulk.import_paths
        bulk.state = "importing"
        for start in range(0, len(paths), MAX_FILES_PER_JOB):
            data = self._api(bw.bulk_import, collection_name=self._store.name, files=[[p] for p in paths[start:start + MAX_FILES_PER_JOB]])
            bulk.job_ids.append(str(data.get("jobId")))
        bar = progress_bar(100 * len(bulk.job_ids), self._progress, unit="%", desc="bulk import")
        shown = 0
        deadline = time.monotonic() + cfg.timeout_s
        waiting = list(bulk.job_ids)
        done: dict[str, int] = {}
        try:
            while waiting:
                percent = 100 * len(done)
                for job in list(waiting):
                    d = self._api(bw.get_import_progress, job_id=job)
                    state = str(d.get("state", ""))
                    if state.lower() == "failed":
                        bulk.state = "failed"
                        raise StoreError(f"bulk import job {job} into {self._store.name!r} failed: {d.get('reason') or d}. Nothing "
                                         f"of it was imported; the files stay under {cfg.bucket}/{bulk.folder} for inspection")
                    if state.lower() == "completed":
                        waiting.remove(job)
                        done[job] = int(d.get("importedRows") or d.get("totalRows") or 0)
                        percent += 100
                    else:
                        percent += int(d.get("progress") or 0)
                bar.update(max(0, percent - shown))
                shown = max(shown, percent)
                if waiting:
                    if time.monotonic() > deadline:
                        raise StoreError(f"bulk import job(s) {', '.join(waiting)} into {self._store.name!r} still running after "
                                         f"{cfg.timeout_s:.0f} s; they go on on the server: check them with pymilvus' "
                                         f"get_import_progress or POST {bulk.api_url}/v2/vectordb/jobs/import/describe", retriable=True)
                    time.sleep(cfg.poll_s)
        finally:
            bar.close()
        bulk.imported_rows = sum(done.values())
        bulk.state = "completed"
        if bulk.imported_rows and bulk.imported_rows != bulk.rows:
            log.warning("bulk import: Milvus reports %d rows imported, %d were written", bulk.imported_rows, bulk.rows)


def _writer_classes(bw: Any) -> tuple[type, type]:
    """pymilvus' Local/RemoteBulkWriter, keeping the error of the thread that writes (and uploads)
    a file: BulkWriter re-raises it inside that thread, where ``commit()``'s caller never sees it."""

    class _Capture:
        error: BaseException | None = None

        def _flush(self, call_back: Any = None) -> None:
            try:
                super()._flush(call_back)  # type: ignore[misc]
            except Exception as e:
                self.error = e

    class Local(_Capture, bw.LocalBulkWriter):
        pass

    class Remote(_Capture, bw.RemoteBulkWriter):
        pass

    return Local, Remote


def _minio(cfg: BulkImportConfig, bw: Any) -> tuple[Any, Any, Any]:
    """A MinIO client (clean-up) and RemoteBulkWriter's connect parameters, sharing one HTTP pool
    with bounded timeouts and retries (minio's defaults wait 5 minutes to connect, 6 times), and a
    client that tries once (the preflight: no retry warnings for an endpoint that isn't there)."""
    import certifi
    import urllib3
    from minio import Minio

    parts = urlsplit(cfg.endpoint if "://" in cfg.endpoint else f"http://{cfg.endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise InputError(f"--minio {cfg.endpoint!r}: give the object store as http(s)://HOST:PORT, e.g. http://localhost:9000")
    secure = parts.scheme == "https"

    def pool(retries: Any) -> Any:
        return urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=300), maxsize=10, cert_reqs="CERT_REQUIRED",
                                   ca_certs=certifi.where(), retries=retries)

    def client(http: Any) -> Any:
        return Minio(parts.netloc, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=secure, region=cfg.region, http_client=http)

    http = pool(urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    connect = bw.RemoteBulkWriter.S3ConnectParam(bucket_name=cfg.bucket, endpoint=parts.netloc, access_key=cfg.access_key,
                                                 secret_key=cfg.secret_key, secure=secure, region=cfg.region, http_client=http)
    return client(http), connect, client(pool(False))


def _short(e: BaseException) -> str:
    return " ".join(str(getattr(e, "message", None) or e).split())[:400]
