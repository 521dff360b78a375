"""The token cache: per-image token arrays the reranker reads at query time.

Images are encoded once, at index time; reranking reads their tokens from here and never
re-encodes a candidate. A cache is one SQLite file (WAL mode: searches read while an index run
writes; a crash loses at most the uncommitted batch) holding one fp16 array per item id, keyed
by a *fingerprint*: the encoder's for raw patch tokens, the encoder's plus the reranker's for a
reranker's projected memory. Opening a cache with another fingerprint is an error, and caches
of different fingerprints live in different files, so tokens from another model are never used.

Layout, next to the collection (file names are spelled by :func:`cache_path` only)::

    <db>.mmr/<collection>/tokens-<fingerprint>.sqlite        Milvus Lite (--db ./mmr.db)
    ~/.cache/mm_retrieval/<host_port>/<collection>/...      a Milvus server (or MMR_CACHE_DIR)

The encoder's raw patch tokens have fingerprint ``raw-<encoder fingerprint>``
(:func:`raw_cache_path`): any reranker trained later derives its memory from them without
decoding an image again.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import IncompatibleError, InputError

FORMAT = "mm_retrieval.tokens/1"
_PREFIX, _SUFFIX = "tokens-", ".sqlite"


def cache_root(uri: str, collection: str) -> Path:
    """Where a collection's caches live (see the module docstring)."""
    if "://" not in uri:
        return Path(uri).expanduser().resolve().with_name(Path(uri).name + ".mmr") / collection
    base = Path(os.environ.get("MMR_CACHE_DIR") or Path.home() / ".cache" / "mm_retrieval")
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("://", 1)[1]).strip("_")
    return base / host / collection


def cache_path(directory: Path, fingerprint: str) -> Path:
    """The file of the cache with ``fingerprint`` in a collection's cache folder."""
    return Path(directory) / f"{_PREFIX}{fingerprint}{_SUFFIX}"


def raw_fingerprint(encoder_fingerprint: str) -> str:
    """The fingerprint of an encoder's raw patch-token cache."""
    return f"raw-{encoder_fingerprint}"


def raw_cache_path(directory: Path, encoder_fingerprint: str) -> Path:
    """Where a collection keeps the raw patch tokens of the encoder with ``encoder_fingerprint``."""
    return cache_path(directory, raw_fingerprint(encoder_fingerprint))


def open_raw_cache(directory: Path, encoder_fingerprint: str) -> "TokenCache | None":
    """The encoder's raw patch-token cache of a collection, or None when there is none."""
    path = raw_cache_path(directory, encoder_fingerprint)
    return TokenCache(path, raw_fingerprint(encoder_fingerprint), create=False) if path.exists() else None


def raw_token_writer(directory: Path, encoder_fingerprint: str) -> "TokenWriter":
    """What an index run writes when no reranker says otherwise: the encoder's raw patch tokens."""
    fp = raw_fingerprint(encoder_fingerprint)
    return TokenWriter(TokenCache(cache_path(directory, fp), fp))


class TokenCache:
    """fp16 arrays of one fixed shape, keyed by item id, in one SQLite file.

    ``add`` buffers; ``commit`` writes the buffer in one transaction. Thread-safe for one
    writer and many readers (each thread gets its own connection).
    """

    def __init__(self, path: str | Path, fingerprint: str, *, create: bool = True):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if not self.path.exists() and not create:
            raise InputError(f"no token cache at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pending: dict[str, np.ndarray] = {}
        db = self._db()
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, data BLOB NOT NULL)")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("fingerprint", fingerprint)])
                meta = {"format": FORMAT, "fingerprint": fingerprint}
        if meta.get("fingerprint") != fingerprint:
            raise IncompatibleError(
                f"token cache {self.path} was written for fingerprint {meta.get('fingerprint')}, not {fingerprint}; "
                "rebuild it with `mmr cache build`"
            )
        self.shape: tuple[int, ...] | None = tuple(json.loads(meta["shape"])) if "shape" in meta else None
        #: What the arrays hold, as their writer described it (see :meth:`set_info`), or None.
        self.info: dict | None = json.loads(meta["info"]) if "info" in meta else None

    def set_info(self, info: dict) -> None:
        """Record what the arrays hold (JSON-serialisable; e.g. a reranker's real token shape
        and storage when it packs other dtypes into the fp16 arrays); ``mmr cache info`` shows it."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('info', ?)", (json.dumps(info),))
        self.info = dict(info)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # ---- writes ----------------------------------------------------------------------------
    def add(self, item_id: str, array: np.ndarray) -> None:
        """Buffer one item's tokens (any float dtype; stored as fp16)."""
        arr = np.ascontiguousarray(array, dtype=np.float16)
        if self.shape is None:
            self.shape = tuple(arr.shape)
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('shape', ?)", (json.dumps(list(self.shape)),))
        elif tuple(arr.shape) != self.shape:
            raise IncompatibleError(f"token array of shape {arr.shape} does not match the cache's {self.shape} ({self.path})")
        self._pending[item_id] = arr

    def commit(self) -> None:
        """Write buffered arrays durably (one transaction)."""
        if not self._pending:
            return
        from . import failpoints

        rows = [(k, v.tobytes()) for k, v in self._pending.items()]
        with self._db() as db:
            for i, row in enumerate(rows):
                db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?)", row)
                if i == len(rows) // 2:
                    failpoints.hit("mid_tokens")  # inside the transaction: it must roll back whole
        self._pending.clear()

    def delete(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        with self._db() as db:
            db.executemany("DELETE FROM tokens WHERE id = ?", [(i,) for i in ids])

    def keep_only(self, ids: Iterable[str]) -> int:
        """Delete every entry whose id is not in ``ids`` (orphans); returns how many went."""
        keep = set(ids)
        orphans = [i for i in self.ids() if i not in keep]
        self.delete(orphans)
        return len(orphans)

    # ---- reads -----------------------------------------------------------------------------
    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached arrays of ``ids`` that are present (missing ids are simply absent)."""
        out: dict[str, np.ndarray] = {}
        if not ids or self.shape is None:
            return out
        db = self._db()
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = list(ids[start : start + 900])
            q = f"SELECT id, data FROM tokens WHERE id IN ({','.join('?' * len(chunk))})"
            for item_id, blob in db.execute(q, chunk):
                out[item_id] = np.frombuffer(blob, dtype=np.float16).reshape(self.shape)
        return out

    def ids(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT id FROM tokens")]

    def __len__(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM tokens").fetchone()[0])

    @property
    def bytes_per_item(self) -> int:
        """Bytes of one item's array (fp16), excluding SQLite's per-row overhead."""
        return int(np.prod(self.shape)) * 2 if self.shape else 0

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class TokenWriter:
    """What an index run writes tokens through: buffers arrays and optionally maps them (e.g. raw
    patch tokens -> a reranker's memory) in batches."""

    def __init__(self, cache: TokenCache, project=None):
        self.cache = cache
        self.project = project  # np [n, P, W] fp16 -> np [n, P, M], or None to store as is
        self._ids: list[str] = []
        self._arrays: list[np.ndarray] = []

    def add(self, item_id: str, tokens: np.ndarray) -> None:
        self._ids.append(item_id)
        self._arrays.append(tokens)

    def commit(self) -> None:
        if not self._ids:
            return
        batch = np.stack(self._arrays)
        if self.project is not None:
            batch = self.project(batch)
        for item_id, arr in zip(self._ids, batch):
            self.cache.add(item_id, arr)
        self.cache.commit()
        self._ids, self._arrays = [], []


def caches_in(directory: Path) -> list[Path]:
    """Every token cache file in a collection's cache folder."""
    return sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}")) if directory.is_dir() else []


def open_existing(path: Path) -> TokenCache:
    """Open a cache file whatever its fingerprint (for maintenance: purge, info)."""
    with sqlite3.connect(path) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return TokenCache(path, meta["fingerprint"], create=False)


def purge(directory: Path, ids: Iterable[str]) -> None:
    """Remove ``ids`` from every token cache of a collection."""
    ids = list(ids)
    if not ids:
        return
    for path in caches_in(directory):
        cache = open_existing(path)
        cache.delete(ids)
        cache.close()
