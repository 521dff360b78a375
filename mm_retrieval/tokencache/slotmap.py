"""A token cache's map: a small SQLite file (WAL) saying which slot of the data files holds which
item id, which slots are free, and what the arrays are.

Tables: ``meta`` (format, fingerprint, shape, info, generation, slots: how many the live
generation's files hold), ``slots`` (id -> slot, stamp), ``free`` (slots no row points at).

Writers take SQLite's write lock (``BEGIN IMMEDIATE``) for the whole of a write, data files
included, so two writers queue instead of handing out the same slot; readers read one snapshot
(WAL: never blocked by the writer) and see only rows whose slots were written and fsync'd.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

FORMAT = "mm_retrieval.tokens/2"  # the map + memory-mapped slots
LEGACY_FORMAT = "mm_retrieval.tokens/1"  # one SQLite file with a blob per id (read once, migrated)
CHUNK = 900  # ids per IN (...) query: under SQLite's bound-parameter limit

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS slots (id TEXT PRIMARY KEY, slot INTEGER NOT NULL, stamp INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS free (slot INTEGER PRIMARY KEY)",
)


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit: :func:`transaction`)."""
    db = sqlite3.connect(path, timeout=60, check_same_thread=True, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns (vector rows follow it)
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
    """One transaction: ``write`` takes the write lock up front (the one writer at a time);
    otherwise a read snapshot, consistent across every statement inside."""
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def read_meta(db: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return {}
        raise


def set_meta(db: sqlite3.Connection, **values) -> None:
    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                   [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()])


def lookup(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """id -> (slot, stamp) for the ``ids`` that have a row."""
    out: dict[str, tuple[int, int]] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = list(ids[start : start + CHUNK])
        q = f"SELECT id, slot, stamp FROM slots WHERE id IN ({','.join('?' * len(chunk))})"
        out.update((i, (s, t)) for i, s, t in db.execute(q, chunk))
    return out


def counts(db: sqlite3.Connection) -> tuple[int, int]:
    """(live rows, free slots)."""
    live = db.execute("SELECT COUNT(*) FROM slots").fetchone()[0]
    free = db.execute("SELECT COUNT(*) FROM free").fetchone()[0]
    return int(live), int(free)


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None
