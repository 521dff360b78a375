"""Store ``milvus``: one Milvus collection through pymilvus' ``MilvusClient`` only.

The same code serves Milvus Lite (a local file URI, the default ``./mmr.db``), a Milvus server
(``http://host:19530``) and a managed cloud (URI + token). Vectors are L2-normalised, so the
default metric ``IP`` is cosine similarity. The collection remembers the encoder that built it
(a collection property), and refuses vectors from another one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...config import DEFAULT_COLLECTION, DEFAULT_DB
from ...errors import IncompatibleError, InputError, StoreError
from ...registry import register
from ...types import Hit
from ..base import Store, batched

log = logging.getLogger(__name__)

ENCODER_PROPERTY = "mmr.encoder"
# Whether the collection holds video segments: "1" yes, "0" none; absent (collections from before
# it was kept): unknown, taken as yes. Grouping a search by media item is only needed with videos
# (without, each row is its own media item) and costs 2.4x a plain search, so it is skipped on "0".
# Writing a segment sets it first (upsert); index and sync runs, which read every row, reset it
# when the last video has gone (record_video_fact).
VIDEO_PROPERTY = "mmr.videos"
# How long a "no video" answer is trusted before asking Milvus again (another process may index a
# video meanwhile): searches in a burst cost one describe call, not one each.
NO_VIDEO_RECHECK_S = 10.0
SCHEMA_VERSION = "3"  # 2: a text vector beside the image vector; 3: media fields (video segments)
MAX_PATH = 4096
MAX_TEXT = 65535
ROW_FIELDS = ["id", "path", "content_hash", "caption", "metadata", "file_size", "mtime_ns", "has_image", "has_text"]
HIT_FIELDS = ["path", "caption", "metadata", "has_image", "has_text"]
# Schema 3: every row belongs to a media item. An image is its own (media_id == id, the rest 0); a
# video segment's media_id is the video's item id, start/end its seconds, frame the time of the
# frame whose vector it holds, segments how many segments the video has (a re-run recognises a
# video whose rows are incomplete).
MEDIA_FIELDS = ["media_id", "start", "end", "frame", "segments"]
# Which vector field a search mode reads, and which rows it considers: items without an image (or
# without text) hold a zero vector there, kept out of results by this condition.
MODE_FIELDS = {"image": ("vector", "has_image == true"), "text": ("text_vector", "has_text == true")}
# What a bad filter's error offers: the fields a user filters on (the others are ours).
FILTER_FIELDS = ("Filters are Milvus boolean expressions over the fields path, caption and metadata (a table's other "
                 "columns: metadata[\"COLUMN\"]), e.g. 'metadata[\"year\"] >= 2020 and caption like \"%dog%\"'")


@dataclass(frozen=True)
class MilvusConfig:
    uri: str = DEFAULT_DB  # "./mmr.db": a file path (Milvus Lite), http(s)://host:port, or a cloud endpoint
    token: str | None = None  # "user:password" or an API key for servers that need one
    collection: str = DEFAULT_COLLECTION  # "images"
    index_type: str = "AUTOINDEX"  # Milvus picks per deployment; HNSW, IVF_FLAT, FLAT ... also work
    metric: str = "IP"  # IP == cosine on normalised vectors; COSINE and L2 also accepted
    index_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"M": 16, "efConstruction": 200}
    search_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"ef": 128}
    insert_batch: int = 512
    timeout: float = 30.0  # seconds for connecting and for each call
    index_wait: float = 120.0  # seconds search waits for a server to finish building the index


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


# Milvus Lite serves each database file from one in-process server, shared by every client of that
# file in the process (pymilvus shares the connection too). A store that closes stops that server
# only when it was the file's last open store: stopping it under another Pipeline (or an `mmr serve`
# engine) of the same process would break that one's next call.
_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}


def _lite_acquire(path: str) -> None:
    with _lite_lock:
        _lite_users[path] = _lite_users.get(path, 0) + 1


def _lite_release(path: str) -> None:
    """Forget one open store of the Milvus Lite file ``path``; the last one stops its server, so
    that another process can open the file."""
    with _lite_lock:
        left = _lite_users.get(path, 0) - 1
        if left > 0:
            _lite_users[path] = left
            return
        _lite_users.pop(path, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)


# Loggers of pymilvus, Milvus Lite and gRPC that report, with a traceback, each failed call that
# reaches us as an exception (a bad filter: ~30 lines before our one-line error), and calls Milvus
# Lite doesn't implement (harmless ones, such as the timestamp request create_collection makes).
MILVUS_LOGGERS = ("pymilvus", "grpc._server", "milvus_lite")


def quiet_milvus_logs() -> None:
    """Silence :data:`MILVUS_LOGGERS`: we raise our own errors. Not while mm_retrieval logs at INFO
    or below (``mmr -v``), where they help find out why. Called after pymilvus is imported: its
    import sets its own logger's level."""
    if logging.getLogger("mm_retrieval").getEffectiveLevel() > logging.INFO:
        for name in MILVUS_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


@register("store", "milvus")
class MilvusStore(Store):
    """A Milvus collection of items: id, vector, path, content hash, caption, metadata (JSON)."""

    Config = MilvusConfig
    search_options = frozenset({"group_by_media", "min_score"})

    # ---- connection ------------------------------------------------------------------------
    def _warm_up(self) -> None:
        self.client = None
        uri = self.config.uri
        if is_local_uri(uri):
            path = Path(uri).expanduser()
            if path.suffix != ".db":
                raise InputError(f"--db {uri}: an embedded Milvus Lite database is a path ending in .db (e.g. ./mmr.db); "
                                 "a server is http://HOST:PORT")
            # Milvus Lite keeps its data in a folder at this path; refuse to take over any other folder
            if path.is_dir() and any(path.iterdir()) and not (path / "collections").exists():
                raise InputError(f"--db {uri} is a folder that is not a Milvus Lite database; give a new path such as {path / 'mmr.db'}")
            if not path.exists():
                # Connecting creates the database (and its folders): wait for the first write
                # (ensure_collection), so that a read or a failed command leaves nothing behind.
                self._forget()
                return
        self._connect()

    def _connect(self) -> None:
        from pymilvus import MilvusClient

        quiet_milvus_logs()
        uri = self.config.uri
        if is_local_uri(uri):
            path = Path(uri).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(path.resolve())
        try:
            self.client = MilvusClient(uri=uri, token=self.config.token or "", timeout=self.config.timeout)
            if is_local_uri(self.config.uri):
                _lite_acquire(uri)
                self._lite_file = uri  # released as it was acquired, even if the working directory changes
        except Exception as e:
            if is_local_uri(self.config.uri) and "open local milvus failed" in str(e).lower():
                raise StoreError(
                    f"the database {self.config.uri} is open in another process (Milvus Lite allows one process "
                    "at a time): wait for it to finish, or share the collection through a Milvus server "
                    "(docker-compose.yml, or `milvus-lite server --data-dir DIR`) and pass --db http://HOST:PORT",
                    retriable=True,
                ) from e
            raise StoreError(
                f"cannot connect to Milvus at {self.config.uri}: {_short(e)}. For a server, check it is running "
                "and reachable (see docker-compose.yml); for a local database pass a file path such as --db ./mmr.db",
                retriable=True,
            ) from e
        self._forget()

    def close(self) -> None:
        """Release the connection. For Milvus Lite also the database, so that another process can
        open it, once no other store of this process (another Pipeline, a server) has it open."""
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None
            self._warm = False
            self._forget()  # another process may change the collection while it is released
            lite, self._lite_file = getattr(self, "_lite_file", None), None
            if lite is not None:  # Milvus Lite serves in-process until its last user closes
                _lite_release(lite)

    @property
    def name(self) -> str:
        return self.config.collection

    @property
    def metric(self) -> str:
        return self.config.metric.upper()

    @property
    def location(self) -> str:
        """The ``uri``: a Milvus Lite file or a server's address."""
        return self.config.uri

    @property
    def local_path(self) -> Path | None:
        """The Milvus Lite file, or None for a server URI."""
        return Path(self.config.uri).expanduser().resolve() if is_local_uri(self.config.uri) else None

    def cache_dir(self) -> Path:
        """Token caches of this collection: beside a Milvus Lite file, or under ~/.cache for a server."""
        from ...tokencache import cache_root

        return cache_root(self.config.uri, self.name)

    @property
    def _milvus(self) -> Any:
        """The connected ``MilvusClient``: connects on first use, and again after :meth:`close`
        (a Milvus Lite file that does not exist yet is created here, by the first call that needs it)."""
        self.warm_up()
        if self.client is None:
            self._connect()
        return self.client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, StoreError):
            raise
        except Exception as e:
            raise StoreError(f"Milvus {what} failed on collection {self.name!r} at {self.config.uri}: {_short(e)}", retriable=_retriable(e)) from e

    # ---- collection lifecycle --------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the collection exists (asks Milvus every time: another process may drop it).
        A Milvus Lite file that isn't there holds no collection: answered without creating it."""
        self.warm_up()
        if self.client is None and self.local_path is not None and not self.local_path.exists():
            return False
        return bool(self._call("has_collection", self._milvus.has_collection, self.name))

    def encoder_info(self) -> dict[str, Any] | None:
        """What the collection recorded about the encoder that built it (None if absent)."""
        if not self.exists():
            return None
        desc = self._call("describe_collection", self._milvus.describe_collection, self.name)
        raw = (desc.get("properties") or {}).get(ENCODER_PROPERTY)
        return json.loads(raw) if raw else None

    def require(self) -> None:
        """Raise a clear error, naming the collections there are, if the collection does not exist."""
        if not self.exists():
            raise InputError(
                f"collection {self.name!r} does not exist in {self.config.uri} ({self._holds()}); index some images first with "
                "`mmr index FOLDER_OR_TABLE` (or pass the right --db / --collection)"
            )

    def _holds(self) -> str:
        """What the database holds, said for an error: its collections (a missing Milvus Lite file
        is not created to find out)."""
        if self.client is None and self.local_path is not None and not self.local_path.exists():
            return "no such database file yet"
        names = sorted(self._call("list_collections", self._milvus.list_collections))
        if not names:
            return "it holds no collection"
        return f"it holds --collection {', '.join(names)}"

    def check_compatible(self, encoder_info: dict[str, Any]) -> None:
        """Refuse an encoder other than the one that built this collection."""
        stored = self.encoder_info()
        if stored is None:
            return
        dim = encoder_info.get("dim")  # None: not known before the model loads (Encoder.cheap_info)
        if stored.get("fingerprint") != encoder_info.get("fingerprint") or (dim is not None and stored.get("dim") != dim):
            raise IncompatibleError(
                f"collection {self.name!r} was built with model {_describe(stored)}, "
                f"but the current model is {_describe(encoder_info)}. Vectors from different models can't be "
                "compared: use the collection's model (omit --model to use it), or index into another --collection."
            )

    def ensure_collection(self, encoder_info: dict[str, Any]) -> None:
        """Create the collection for this encoder if needed; refuse one built by another encoder."""
        if self.exists():
            self.check_compatible(encoder_info)
            self._load()
            return
        from pymilvus import DataType, MilvusClient

        dim = int(encoder_info["dim"])
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)  # the image embedding
        schema.add_field("text_vector", DataType.FLOAT_VECTOR, dim=dim)  # the item's text embedding
        schema.add_field("has_image", DataType.BOOL)
        schema.add_field("has_text", DataType.BOOL)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("caption", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("metadata", DataType.JSON)
        # size + mtime let a re-run skip unchanged files without reading them
        schema.add_field("file_size", DataType.INT64)
        schema.add_field("mtime_ns", DataType.INT64)
        schema.add_field("media_id", DataType.VARCHAR, max_length=64)  # grouping key (search group_by_media)
        for name in ("start", "end", "frame"):
            schema.add_field(name, DataType.FLOAT)
        schema.add_field("segments", DataType.INT64)
        index = self._milvus.prepare_index_params()
        for vector_field in ("vector", "text_vector"):
            index.add_index(
                field_name=vector_field, index_type=self.config.index_type, metric_type=self.config.metric,
                params=dict(self.config.index_params),
            )
        props = {ENCODER_PROPERTY: json.dumps(encoder_info, sort_keys=True), "mmr.schema": SCHEMA_VERSION, VIDEO_PROPERTY: "0"}
        self._call(
            "create_collection", self._milvus.create_collection,
            self.name, schema=schema, index_params=index, consistency_level="Strong", properties=props,
        )
        self._forget()
        if self.encoder_info() is None:  # older servers ignore properties at creation
            self._call("alter_collection_properties", self._milvus.alter_collection_properties, self.name, properties=props)
        self._videos, self._videos_read_at = False, time.monotonic()  # created empty, VIDEO_PROPERTY "0"
        self._load()

    def _load(self) -> None:
        self._call("load_collection", self._milvus.load_collection, self.name)
        self._loaded = True

    def _ensure_loaded(self) -> None:
        """A collection opened by a new process starts released; reads need it loaded."""
        if not getattr(self, "_loaded", False):
            self._load()

    def drop(self) -> None:
        """Delete the collection and its token caches."""
        import shutil

        if self.exists():
            self._call("drop_collection", self._milvus.drop_collection, self.name)
        self._forget()
        shutil.rmtree(self.cache_dir(), ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        """The collection as Milvus describes it (``describe_collection``: fields, properties)."""
        return self._call("describe_collection", self._milvus.describe_collection, self.name)

    def refresh(self) -> None:
        """Forget what this object knows about the collection (schema, loaded, index ready): rows
        that landed another way (a bulk import) are then loaded and indexed before the next read."""
        self._forget()

    def _forget(self) -> None:
        """Drop what this object cached about the collection (schema, loaded, index ready)."""
        self._fields = None
        self._loaded = False
        self._index_ready = False
        self._videos: bool | None = None  # VIDEO_PROPERTY as last read or written
        self._videos_read_at = 0.0  # when _videos was last read from Milvus (time.monotonic)

    # ---- writes ----------------------------------------------------------------------------
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace rows (``ROW_FIELDS`` + ``vector``, and on a schema-3 collection the
        media fields), in batches of ``insert_batch`` rows. A segment row on an older collection
        is an InputError naming the fix."""
        media = self.has_media_fields()
        if not media and any(r.get("media_id") not in (None, r["id"]) for r in rows):
            raise InputError(
                f"collection {self.name!r} was created before videos could be indexed (it has no media fields), so video "
                "segments can't be stored in it: index the videos into a new --collection (images keep working in this one)"
            )
        if media and any(r.get("media_id") not in (None, r["id"]) for r in rows):
            self.record_video_fact(True)  # before the segments land: the fact is never false while they exist
        for chunk in batched(rows, self.config.insert_batch):
            self._call("upsert", self._milvus.upsert, self.name, [clean_row(r, media) for r in chunk])

    def delete(self, ids: Iterable[str]) -> None:
        """Remove the rows with these ids, in batches; unknown ids are ignored."""
        for chunk in batched(list(ids), self.config.insert_batch):
            self._call("delete", self._milvus.delete, self.name, ids=chunk)

    def flush(self) -> None:
        """Seal the rows written so far. On Milvus Lite too: it searches rows still in growing
        segments by brute force (measured at 10k rows: 433 ms per search unflushed, 15 ms
        flushed, for a 2 s flush), so an index run ends with one."""
        self._call("flush", self._milvus.flush, self.name)

    # ---- reads -----------------------------------------------------------------------------
    def count(self) -> int:
        """Rows in the collection (0 when it does not exist)."""
        if not self.exists():
            return 0
        self._ensure_loaded()
        res = self._call("count", self._milvus.query, self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), filter: str = "") -> Iterator[dict[str, Any]]:
        """Every row's ``fields``, streamed in id ranges.

        Ids are hex content hashes, so prefix ranges split the collection evenly; a range that
        comes back full is split again. (query_iterator is avoided: on Milvus Lite it has
        repeated and dropped rows.)
        """
        if not self.exists():
            return
        self._ensure_loaded()
        fields = list(dict.fromkeys(["id", *fields]))
        total = self.count()
        depth = 0
        while 16 ** depth * self.PAGE < total:
            depth += 1
        prefixes = [format(i, f"0{depth}x") for i in range(16 ** depth)] if depth else [""]
        yield from self._rows_in_ranges(prefixes, fields, filter)

    PAGE = 8000  # rows per range query; Milvus caps one query at 16384

    def _rows_in_ranges(self, prefixes: list[str], fields: list[str], filter: str) -> Iterator[dict[str, Any]]:
        for prefix in prefixes:
            cond = f'id like "{prefix}%"' if prefix else 'id != ""'
            expr = f"({cond}) and ({filter})" if filter else cond
            rows = self._call("query", self._milvus.query, self.name, filter=expr, output_fields=fields, limit=16384)
            if len(rows) >= 16384:  # skewed range (ids not from content hashes): split it
                yield from self._rows_in_ranges([prefix + c for c in "0123456789abcdef"], fields, filter)
                non_hex = f'({cond}) and not ({" or ".join(f"id like {chr(34)}{prefix}{c}%{chr(34)}" for c in "0123456789abcdef")})'
                yield from self._call("query", self._milvus.query, self.name, filter=non_hex + (f" and ({filter})" if filter else ""), output_fields=fields, limit=16384)
            else:
                yield from rows

    def get(self, ids: Sequence[str], fields: Sequence[str] = ROW_FIELDS) -> list[dict[str, Any]]:
        """The rows with these ids (1000 per call), each with ``id`` and ``fields``."""
        if not ids:
            return []
        self._ensure_loaded()
        out: list[dict[str, Any]] = []
        for chunk in batched(list(ids), 1000):
            out.extend(self._call("get", self._milvus.get, self.name, ids=chunk, output_fields=list(fields)))
        return out

    def has_text_vectors(self) -> bool:
        """Whether this collection has a text vector field (collections from schema 1 don't).
        The schema is read once per store object (searches ask on every query)."""
        return "text_vector" in self._schema_fields()

    def has_media_fields(self) -> bool:
        """Whether rows carry media fields (schema 3): video segments can be stored and
        searches grouped by media item. A missing collection: True (it would be created so)."""
        if not self.exists():
            return True
        return "media_id" in self._schema_fields()

    def _schema_fields(self) -> set[str]:
        if getattr(self, "_fields", None) is not None:
            return self._fields
        if not self.exists():
            return set()
        desc = self._call("describe_collection", self._milvus.describe_collection, self.name)
        self._fields = {f["name"] for f in desc.get("fields", [])}
        return self._fields

    def holds_video(self) -> bool:
        """Whether the collection may hold video segments (:data:`VIDEO_PROPERTY`; absent: yes).
        Yes is remembered; no is asked again after :data:`NO_VIDEO_RECHECK_S` (one describe
        call: another process may have indexed a video since)."""
        if self._videos:
            return True
        if "media_id" not in self._schema_fields():
            return False  # images only: the collection predates videos
        if self._videos is False and time.monotonic() - self._videos_read_at < NO_VIDEO_RECHECK_S:
            return False
        return self._video_property() is not False

    def _video_property(self) -> bool | None:
        """:data:`VIDEO_PROPERTY` as stored (None: absent), remembered."""
        desc = self._call("describe_collection", self._milvus.describe_collection, self.name)
        value = (desc.get("properties") or {}).get(VIDEO_PROPERTY)
        self._videos = None if value is None else value != "0"
        self._videos_read_at = time.monotonic()
        return self._videos

    def record_video_fact(self, holds: bool) -> None:
        """Set :data:`VIDEO_PROPERTY`: yes before a segment is written (:meth:`upsert`); no by a
        run that has read every row and left no segment (index and sync, under their lock)."""
        if not self.has_media_fields():
            return
        if (self._videos if self._videos is not None else self._video_property()) is holds:
            return
        self._call("alter_collection_properties", self._milvus.alter_collection_properties, self.name,
                   properties={VIDEO_PROPERTY: "1" if holds else "0"})
        self._videos, self._videos_read_at = holds, time.monotonic()

    def _hit_fields(self) -> list[str]:
        return HIT_FIELDS + (MEDIA_FIELDS[:4] if "media_id" in self._schema_fields() else [])

    def _group(self, group_by_media: bool) -> dict[str, Any]:
        """Milvus' grouping search (best row per media_id), on collections that may hold videos;
        without any, each row is its own media item: nothing to group, and the plain search
        returns the same hits for less."""
        return {"group_by_field": "media_id"} if group_by_media and self.holds_video() else {}

    def query(self, filter: str, fields: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """At most ``limit`` (<= 16384, Milvus' cap) rows matching ``filter``, with ``fields``."""
        self._ensure_loaded()  # a collection opened by a new process starts released
        return self._call("query", self._milvus.query, self.name, filter=filter, output_fields=list(fields), limit=limit)

    def count_with_text(self) -> int:
        """Rows with a text vector (0 for a collection without text vectors)."""
        if not self.has_text_vectors():
            return 0
        self._ensure_loaded()
        res = self._call("count", self._milvus.query, self.name, filter="has_text == true", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search(self, vectors: np.ndarray, limit: int, filter: str = "", *, mode: str = "image",
               group_by_media: bool = False, min_score: float | None = None) -> list[list[Hit]]:
        """``mode`` "image" searches image vectors, "text" the items' text vectors;
        ``group_by_media``: Milvus' grouping search on ``media_id`` (``limit`` media items, each
        its best row). ``min_score``: Milvus' range search, every hit scoring above it (at most
        ``limit``) instead of a fixed top ``limit``."""
        self._wait_for_index()
        field, only = self._mode_field(mode)
        data = np.asarray(vectors, dtype=np.float32)
        params = {"metric_type": self.config.metric, "params": {**self.config.search_params, **self._range(min_score)}}
        group = self._group(group_by_media)
        res = self._grouped(bool(group), limit, lambda n: self._searching(filter, lambda: self._milvus.search(
            self.name, data=data.tolist(), limit=n, filter=_and(only, filter), output_fields=self._hit_fields(),
            search_params=params, anns_field=field, **group,
        )))
        sign = -1.0 if self.config.metric.upper() == "L2" else 1.0  # L2: smaller is closer
        return [[_hit(r, sign * float(r["distance"]), i) for i, r in enumerate(hits)] for hits in res]

    def neighbour_ids(self, vectors: np.ndarray, limit: int, filter: str = "") -> list[list[tuple[str, float]]]:
        """For each query vector [Q, D], the ``(id, similarity)`` of its best ``limit`` image rows:
        :meth:`search` without the hits' fields (``mmr duplicates`` asks this once per item; on
        Milvus Lite fetching the fields, or a range search, takes longer than the search itself)."""
        self._wait_for_index()
        field, only = self._mode_field("image")
        params = {"metric_type": self.config.metric, "params": dict(self.config.search_params)}
        res = self._searching(filter, lambda: self._milvus.search(
            self.name, data=np.asarray(vectors, dtype=np.float32).tolist(), limit=limit, filter=_and(only, filter),
            output_fields=["id"], search_params=params, anns_field=field,
        ))
        sign = -1.0 if self.config.metric.upper() == "L2" else 1.0
        return [[(str(r["id"]), sign * float(r["distance"])) for r in hits] for hits in res]

    def _range(self, min_score: float | None) -> dict[str, float]:
        """Range-search params for hits scoring above ``min_score``: Milvus' ``radius`` is the
        outer bound, exclusive (IP/COSINE: similarity > radius; L2: distance < radius, and a
        hit's score is minus its distance)."""
        if min_score is None:
            return {}
        if not math.isfinite(min_score):
            raise InputError(f"--min-score must be a finite number, got {min_score!r}")
        return {"radius": -min_score if self.config.metric.upper() == "L2" else float(min_score)}

    def hybrid_search(self, vector: np.ndarray, limit: int, filter: str = "", *, ranker: str = "rrf",
                      weights: tuple[float, float] = (0.5, 0.5), rrf_k: int = 60, images_only: bool = False,
                      group_by_media: bool = False, min_score: float | None = None) -> list[Hit]:
        """One query vector against image and text vectors, fused by Milvus' own RRF or weighted
        ranker. Each hit's ``image_score`` is its image-vector similarity (what a reranker builds
        on) and ``text_score`` its text-vector similarity (None without text), so a reranked image
        leg can be fused with the text leg again (:mod:`mm_retrieval.stages.fusion`).
        ``images_only`` keeps text-only items out (for reranking, which needs images);
        ``group_by_media`` keeps each media item's best fused row (Milvus' grouping on ``media_id``).
        ``min_score``: each leg is a range search (an item is found when its image or its text
        scores above it); the fused score is a rank fusion, so the cut is on the similarities."""
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        self._wait_for_index()
        if not self.has_text_vectors():
            raise InputError(f"collection {self.name!r} has no text vectors; re-create it with this version (index into a new --collection)")
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        params = {"metric_type": self.config.metric, "params": {**self.config.search_params, **self._range(min_score)}}
        image_only = "has_image == true"
        def requests(n: int) -> list[Any]:
            return [
                AnnSearchRequest(data=[q.tolist()], anns_field="vector", param=params, limit=n, expr=_and(image_only, filter)),
                AnnSearchRequest(data=[q.tolist()], anns_field="text_vector", param=params, limit=n,
                                 expr=_and("has_text == true" + (" and has_image == true" if images_only else ""), filter)),
            ]

        if ranker == "rrf":
            fuse = RRFRanker(rrf_k)
        elif ranker == "weighted":
            fuse = WeightedRanker(*weights)
        else:
            raise InputError(f"unknown hybrid ranker {ranker!r}; use rrf or weighted")
        group = self._group(group_by_media)
        res = self._grouped(bool(group), limit, lambda n: self._searching(filter, lambda: self._milvus.hybrid_search(
            self.name, requests(n), ranker=fuse, limit=n, output_fields=[*self._hit_fields(), "vector", "text_vector"], **group,
        )))[0]
        hits = []
        for i, r in enumerate(res):
            hit, e = _hit(r, float(r["distance"]), i), r["entity"]
            if hit.has_image:
                hit.image_score = float(np.dot(np.asarray(e["vector"], dtype=np.float32), q))
            if e.get("has_text", False):
                hit.text_score = float(np.dot(np.asarray(e["text_vector"], dtype=np.float32), q))
            hits.append(hit)
        if min_score is not None:  # Milvus Lite ignores a hybrid leg's radius: the cut, made here too
            hits = [h for h in hits if max(s for s in (h.image_score, h.text_score, -math.inf) if s is not None) > min_score]
            for i, h in enumerate(hits):
                h.rank = i + 1
        return hits

    GROUP_LIMIT = 16384  # Milvus' cap on a search's limit

    def _grouped(self, grouping: bool, limit: int, run: Callable[[int], Any]) -> Any:
        """``run(limit)`` (a search returning one list of hits per query), for a grouping search
        until each query has ``limit`` groups: Milvus groups a bounded pool of top rows, so when a
        few videos fill that pool it returns fewer groups than asked (measured: 5 of 10 asked, where
        asking for 20 gave 20). Then the limit is doubled until every query has ``limit`` groups or
        the collection has no more, and the first ``limit`` of each are kept."""
        res = run(limit)
        if not grouping or all(len(hits) >= limit for hits in res):
            return res
        n, rows, flat = limit, self.count(), 0
        # a doubling can find no new group while a later one does: stop when the limit covers every
        # row, or after two doublings in a row that found nothing (a filter that matches few items)
        while n < min(self.GROUP_LIMIT, rows) and flat < 2 and any(len(hits) < limit for hits in res):
            before = [len(hits) for hits in res]
            n = min(n * 2, self.GROUP_LIMIT)
            res = run(n)
            flat = flat + 1 if [len(hits) for hits in res] == before else 0
        return [list(hits)[:limit] for hits in res]

    def _mode_field(self, mode: str) -> tuple[str, str]:
        if mode not in MODE_FIELDS:
            raise InputError(f"unknown search mode {mode!r}; use image, text or hybrid")
        if mode == "text" and not self.has_text_vectors():
            raise InputError(f"collection {self.name!r} has no text vectors; re-create it with this version (index into a new --collection)")
        field, only = MODE_FIELDS[mode]
        return field, (only if self.has_text_vectors() else "")

    def check_filter(self, filter: str) -> None:
        """Milvus' parser and type checker on ``filter`` against this collection's schema, through
        a query for one id (no vectors, no model): InputError naming the problem and the fields a
        filter can use."""
        if not filter:
            return
        self.require()
        self._ensure_loaded()
        self._searching(filter, lambda: self._milvus.query(self.name, filter=_and(filter), output_fields=["id"], limit=1))

    def _searching(self, filter: str, call):
        if filter:
            try:  # a lone surrogate (e.g. a non-UTF-8 argv byte) can't even be sent to Milvus
                filter.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"invalid filter expression {filter!r}: it is not valid Unicode text; pass plain text") from None
        try:
            return call()
        except Exception as e:
            # Existence is checked once per store, not per query: a collection dropped since
            # (by another process) gets the same clear message here.
            if not self._exists_quietly():
                self._forget()
                self.require()
            if filter and _is_expression_error(e):
                raise InputError(f"invalid filter expression {filter!r}: {_filter_problem(filter, e)}. {FILTER_FIELDS}") from e
            raise StoreError(f"Milvus search failed on collection {self.name!r}: {_short(e)}", retriable=_retriable(e)) from e

    def _exists_quietly(self) -> bool:
        """``exists()``, assuming yes when Milvus can't even answer that (the original error wins)."""
        try:
            return self.exists()
        except StoreError:
            return True

    def _wait_for_index(self) -> None:
        """A server builds indexes asynchronously; wait (bounded) until it has caught up."""
        if self._index_ready:
            return
        self.warm_up()
        self.require()
        if not is_local_uri(self.config.uri):
            deadline = time.monotonic() + self.config.index_wait
            while time.monotonic() < deadline:
                info = self._call("describe_index", self._milvus.describe_index, self.name, "vector")
                if not info or int(info.get("pending_index_rows", 0)) == 0:
                    break
                time.sleep(0.5)
            else:
                log.warning("index on %s still building after %.0fs; searching anyway", self.name, self.config.index_wait)
        self._load()
        self._index_ready = True


def _and(*conditions: str) -> str:
    return " and ".join(f"({c})" for c in conditions if c)


def _hit(r: dict[str, Any], score: float, i: int) -> Hit:
    e = r["entity"]
    hit = Hit(
        id=str(r["id"]), path=e.get("path", ""), score=score, retrieval_score=score, caption=e.get("caption") or None,
        metadata=e.get("metadata") or {}, rank=i + 1, has_image=e.get("has_image", True),
    )
    media = e.get("media_id")
    if media and media != hit.id:  # a video segment
        hit.video_id, hit.start, hit.end, hit.frame = media, float(e["start"]), float(e["end"]), float(e["frame"])
    return hit


def clean_row(r: dict[str, Any], media: bool = True) -> dict[str, Any]:
    """A row as :meth:`MilvusStore.upsert` takes it -> the values sent to Milvus (defaults filled
    in, the caption capped, a zero text vector for an item without text; with ``media`` the media
    fields); the bulk import writes the same values into its files."""
    vector = np.asarray(r["vector"], dtype=np.float32)
    text_vector = r.get("text_vector")
    fields = {}
    if media:  # an image is its own media item
        fields = {"media_id": r.get("media_id") or r["id"], "start": float(r.get("start") or 0.0), "end": float(r.get("end") or 0.0),
                  "frame": float(r.get("frame") or 0.0), "segments": int(r.get("segments") or 0)}
    return {**fields,
        "id": r["id"],
        "vector": vector.tolist(),
        # no text: a zero vector, never returned (text searches only consider has_text rows)
        "text_vector": (np.zeros_like(vector) if text_vector is None else np.asarray(text_vector, dtype=np.float32)).tolist(),
        "has_image": bool(r.get("has_image", True)),
        "has_text": text_vector is not None,
        "path": r["path"],
        "content_hash": r.get("content_hash", ""),
        "caption": (r.get("caption") or "")[:MAX_TEXT // 4],  # bytes: up to 4 per char in UTF-8
        "metadata": r.get("metadata") or {},
        "file_size": int(r.get("file_size") or 0),
        "mtime_ns": int(r.get("mtime_ns") or 0),
    }


def _describe(info: dict[str, Any]) -> str:
    model = info.get("model") or info.get("stage") or "?"
    pre = info.get("pretrained")
    extra = f" (pretrained {pre})" if pre else ""
    return f"{model}{extra} [dim {info.get('dim')}, fingerprint {info.get('fingerprint')}]"


def _short(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return " ".join(str(msg).split())[:500]


def _filter_problem(filter: str, e: Exception) -> str:
    """Milvus' complaint about ``filter``, told about the user's text. Milvus quotes the whole
    expression it got (the filter inside the mode's own condition, ``(has_image == true) and
    (FILTER)``) with a column into it and a caret line; keep its reason and hint, and give the
    column in ``filter`` (or none when it can't be placed there)."""
    lines = str(getattr(e, "message", None) or e).split("\n")
    found = re.fullmatch(r"(.*) at column (\d+)", lines[0])
    carets = next((i for i, line in enumerate(lines) if i and line.strip() and not line.strip(" ^")), None)
    if found is None or carets is None:
        return _short(e)
    sent = "\n".join(lines[1:carets])[2:]  # echoed with a two-space indent
    start = sent.rfind(f"({filter})") + 1  # where the filter starts in it (0: not found)
    column = int(found[2]) - start  # 1-based, in the filter
    reason, where = found[1], ""
    if start and column > len(filter):  # e.g. "unexpected token ')'": the wrapper's own parenthesis
        reason = "unexpected end of expression"
    elif start and column >= 1:
        where = f" at column {column}"
    hint = " ".join(" ".join(lines[carets + 1:]).split())
    if hint.startswith("available fields"):  # every field, ours included: the message names the user's
        hint = ""
    return (reason + where + (f" ({hint})" if hint else ""))[:500]


def _retriable(e: Exception) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("unavailable", "timeout", "timed out", "connection", "deadline"))


def _is_expression_error(e: Exception) -> bool:
    # Milvus Lite reports every filter it can't parse or type-check with code 6 (messages such as
    # "unterminated string literal", "unknown function", "must evaluate to bool" matched none of
    # the words below) and a too deeply nested one as "maximum recursion depth exceeded"; a
    # server uses code 1100 (ParameterInvalid) and words like "cannot parse expression".
    if getattr(e, "code", None) in (6, 1100):
        return True
    text = str(e).lower()
    return any(w in text for w in ("token", "expr", "parse", "field", "invalid", "syntax", "cannot", "literal", "recursion"))
