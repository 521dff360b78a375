"""The token cache: per-image token arrays the reranker reads at query time.

Images are encoded once, at index time; reranking reads their tokens from here and never
re-encodes a candidate. A cache holds one fp16 array of one fixed shape per item id, keyed by a
*fingerprint*: the encoder's for raw patch tokens, the encoder's plus the reranker's for a
reranker's projected memory. Opening a cache with another fingerprint is an error, and caches of
different fingerprints live in different files, so tokens from another model are never used.

A cache is a small SQLite map (:mod:`.slotmap`: id -> slot, free slots, shape) and flat data
files of fixed-size slots (:mod:`.slots`), read by gathering the candidates' slots from a
``numpy.memmap`` into one contiguous array. One writer at a time (SQLite's write lock), readers
never blocked; an item's slot is written and fsync'd before its map row commits, and an index
run writes the vector row only after that, so a killed run leaves no row pointing at garbage.
Deleted and overwritten items free their slots for later writes; :meth:`TokenCache.compact` (and
deletes past :data:`COMPACT_FREE_FRACTION`) rewrite the live slots into a new generation of the
data files while readers go on reading the old one. A cache of the old format (one SQLite file
of blobs) is migrated the first time it is opened (:mod:`.legacy`).

Layout, next to the collection (file names are spelled by :func:`cache_path` only)::

    <db>.mmr/<collection>/tokens-<fingerprint>.sqlite     the map        Milvus Lite (--db ./mmr.db)
    <db>.mmr/<collection>/tokens-<fingerprint>.g<N>.slots   the arrays (+ .stamps)
    ~/.cache/mm_retrieval/<host_port>/<collection>/...   a Milvus server (or MMR_CACHE_DIR)

The encoder's raw patch tokens have fingerprint ``raw-<encoder fingerprint>``
(:func:`raw_cache_path`): any reranker trained later derives its memory from them without
decoding an image again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import failpoints
from ..errors import IncompatibleError, InputError
from . import budget as budgets
from . import slotmap
from .slotmap import FORMAT, LEGACY_FORMAT, read_meta, set_meta, transaction
from .slots import SlotFile, data_files, fsync_dir, new_stamp

log = logging.getLogger(__name__)

_PREFIX, _SUFFIX = "tokens-", ".sqlite"
#: Deletes leave more than this fraction of the slots free (and COMPACT_MIN_BYTES): compact.
COMPACT_FREE_FRACTION = 0.5
COMPACT_MIN_BYTES = 64 << 20
_DTYPE = "float16"
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_TRIES = 50  # lookups per gather while rows keep moving under a busy writer
_MEMO_MAX = 200_000  # ids whose rows a reader keeps between writes (then it starts over)
_KEEP_PINNED_BYTES = 512 << 20  # a host staging buffer up to this size is kept for the next read


def cache_root(uri: str, collection: str) -> Path:
    """Where a collection's caches live (see the module docstring)."""
    if "://" not in uri:
        return Path(uri).expanduser().resolve().with_name(Path(uri).name + ".mmr") / collection
    base = Path(os.environ.get("MMR_CACHE_DIR") or Path.home() / ".cache" / "mm_retrieval")
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("://", 1)[1]).strip("_")
    return base / host / collection


def cache_path(directory: Path, fingerprint: str) -> Path:
    """The map file of the cache with ``fingerprint`` in a collection's cache folder (its data
    files sit beside it)."""
    return Path(directory) / f"{_PREFIX}{fingerprint}{_SUFFIX}"


def raw_fingerprint(encoder_fingerprint: str) -> str:
    """The fingerprint of an encoder's raw patch-token cache."""
    return f"raw-{encoder_fingerprint}"


def raw_cache_path(directory: Path, encoder_fingerprint: str) -> Path:
    """Where a collection keeps the raw patch tokens of the encoder with ``encoder_fingerprint``."""
    return cache_path(directory, raw_fingerprint(encoder_fingerprint))


def open_raw_cache(directory: Path, encoder_fingerprint: str) -> TokenCache | None:
    """The encoder's raw patch-token cache of a collection, or None when there is none."""
    path = raw_cache_path(directory, encoder_fingerprint)
    return TokenCache(path, raw_fingerprint(encoder_fingerprint), create=False) if path.exists() else None


def raw_token_writer(directory: Path, encoder_fingerprint: str) -> TokenWriter:
    """What an index run writes when no reranker says otherwise: the encoder's raw patch tokens."""
    fp = raw_fingerprint(encoder_fingerprint)
    return TokenWriter(TokenCache(cache_path(directory, fp), fp))


class TokenCache:
    """fp16 arrays of one fixed shape, keyed by item id: a slot map and memory-mapped slots.

    ``add`` buffers; ``commit`` writes the buffer (slots, fsync, then the map rows in one
    transaction). Thread-safe for one writer and many readers (each thread its own connection);
    other processes may read, and a second writer waits for the first's commit.
    ``progress``: the bar of a one-time migration from the old format (None: on a terminal).
    """

    def __init__(self, path: str | Path, fingerprint: str, *, create: bool = True, progress: bool | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if not self.path.exists() and not create:
            raise InputError(f"no token cache at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pending: dict[str, np.ndarray] = {}
        self._files_lock = threading.Lock()
        self._read_files: SlotFile | None = None  # the generation readers gather from
        self._write_files: SlotFile | None = None
        meta = self._open_map()
        self._inode = self.path.stat().st_ino
        if meta.get("fingerprint") != fingerprint:
            raise IncompatibleError(
                f"token cache {self.path} was written for fingerprint {meta.get('fingerprint')}, not {fingerprint}; "
                "rebuild it with `mmr cache build`"
            )
        if meta.get("format") == LEGACY_FORMAT:
            from .legacy import migrate

            migrate(self._db(), self.path, self._base, fingerprint, progress=progress)
            meta = read_meta(self._db())
        if meta.get("format") != FORMAT:
            raise IncompatibleError(f"token cache {self.path} is format {meta.get('format')!r}; this mm_retrieval reads {FORMAT} "
                                    f"(and migrates {LEGACY_FORMAT}): upgrade mm_retrieval, or delete the cache's files and run `mmr cache build`")
        self.shape: tuple[int, ...] | None = tuple(json.loads(meta["shape"])) if "shape" in meta else None
        #: What the arrays hold, as their writer described it (see :meth:`set_info`), or None.
        self.info: dict | None = json.loads(meta["info"]) if "info" in meta else None
        #: "eager" (tokens written at index time; a missing one is an error) or "lazy" (a reranker
        #: fills missing ones at query time from the items' files): see :meth:`set_policy`.
        self.fill: str = meta.get("fill", "eager")
        #: The bound on live slots (:mod:`.budget`), or None.
        self.budget: tuple[str, int] | None = tuple(json.loads(meta["budget"])) if meta.get("budget") else None  # type: ignore[assignment]
        self._touched: dict[str, int] = {}  # id -> when last read (ns), flushed to the map by the next write
        #: Slots this instance evicted to stay within the budget (tests, benchmarks).
        self.evicted = 0

    def _open_map(self) -> dict[str, str]:
        """The map's meta, creating the tables of a new cache; IncompatibleError for a file that
        is not a token cache."""
        try:
            db = self._db()
            meta = read_meta(db)
            if not meta or not slotmap.has_table(db, "slots"):
                with transaction(db, write=True):
                    meta = read_meta(db)
                    foreign = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {"meta", "slots", "free", "tokens"}
                    if not meta and foreign:
                        raise IncompatibleError(f"{self.path} is an SQLite file of something else (tables {sorted(foreign)}), not a token "
                                                "cache; move it away, or point --db elsewhere")
                    for statement in slotmap.SCHEMA:
                        db.execute(statement)
                    if not meta:
                        set_meta(db, format=FORMAT, fingerprint=self.fingerprint)
                        meta = read_meta(db)
            return meta
        except sqlite3.DatabaseError as e:
            self.close()
            raise IncompatibleError(f"{self.path} is not a token cache ({e}); delete it (and its .g*.slots files) and run `mmr cache build`") from e

    def replaced(self) -> bool:
        """Whether the map file at :attr:`path` is no longer the one this instance opened (deleted
        and rebuilt since): a long-lived reader then opens the cache again."""
        try:
            return self.path.stat().st_ino != self._inode
        except FileNotFoundError:
            return True

    def set_info(self, info: dict) -> None:
        """Record what the arrays hold (JSON-serialisable; e.g. a reranker's real token shape
        and storage when it packs other dtypes into the fp16 arrays); ``mmr cache info`` shows it."""
        with transaction(self._db(), write=True) as db:
            set_meta(db, info=json.dumps(info))
        self.info = dict(info)

    def set_policy(self, fill: str, budget: str | int | None = None) -> None:
        """How the cache is filled (``eager``: at index time, ``lazy``: by the reranker at query
        time) and its bound (``20GB``, or a number of images; None: unbounded). Kept in the map, so
        every later reader and writer honours it; a bound below what the cache holds evicts the
        least recently used slots at the next write."""
        if fill not in budgets.FILLS:
            raise InputError(f"unknown token fill {fill!r}; use one of {', '.join(budgets.FILLS)}")
        bound = budgets.parse_budget(budget)
        with transaction(self._db(), write=True) as db:
            db.execute(budgets.USED_SCHEMA)
            set_meta(db, fill=fill, budget=json.dumps(list(bound)) if bound else "")
        self.fill, self.budget = fill, bound

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = slotmap.connect(self.path)
        return db

    def _base(self, generation: int) -> Path:
        """The data files of ``generation``, less their suffix (``tokens-<fp>.g<N>``)."""
        return self.path.with_name(f"{self.path.stem}.g{generation}")

    def _expect(self, generation: int, shape: Sequence[int]) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "generation": generation, "dtype": _DTYPE, "shape": [int(x) for x in shape]}

    # ---- writes ----------------------------------------------------------------------------
    def add(self, item_id: str, array: np.ndarray) -> None:
        """Buffer one item's tokens (any float dtype; stored as fp16)."""
        arr = np.ascontiguousarray(array, dtype=np.float16)
        if self.shape is None:
            with transaction(self._db(), write=True) as db:
                held = read_meta(db).get("shape")  # another writer may have set it since this cache was opened
                self.shape = tuple(json.loads(held)) if held else tuple(arr.shape)
                if not held:
                    set_meta(db, shape=list(self.shape))
        if tuple(arr.shape) != self.shape:
            raise IncompatibleError(f"token array of shape {arr.shape} does not match the cache's {self.shape} ({self.path})")
        self._pending[item_id] = arr

    def commit(self, *, keep: Iterable[str] = ()) -> None:
        """Write buffered arrays durably: each into a free (or new) slot, fsync, then the map rows
        in one transaction. Nothing of the batch is visible (or pointed at) until that commit; an
        overwritten item's old slot is freed by it. A full disk raises InputError and leaves the
        cache as it was. With a budget, the least recently used items (never the batch's nor
        ``keep``: e.g. the rest of a query's candidates) are evicted first, in their own commit."""
        if not self._pending:
            return
        items = list(self._pending.items())
        if self.budget is not None:
            self._make_room([k for k, _ in items], keep)
        try:
            with transaction(self._db(), write=True) as db:
                meta = read_meta(db)
                files = self._files_for_writing(db, meta)
                old = slotmap.lookup(db, [k for k, _ in items])
                free = [r[0] for r in db.execute("SELECT slot FROM free ORDER BY slot LIMIT ?", (len(items),))]
                top = int(meta.get("slots", 0))
                fresh = list(range(top, top + len(items) - len(free)))
                rows = []
                for i, ((item_id, arr), slot) in enumerate(zip(items, free + fresh)):
                    stamp = new_stamp()
                    files.write(slot, stamp, arr.data)
                    rows.append((item_id, slot, stamp))
                    if i == len(items) // 2:
                        failpoints.hit("mid_tokens")  # inside the write: nothing of the batch may show
                files.sync()  # the slots are durable before any row points at them
                db.executemany("DELETE FROM free WHERE slot = ?", [(s,) for s in free])
                db.executemany("INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", rows)
                db.executemany("INSERT INTO free VALUES (?)", [(s,) for s, _ in old.values()])
                if fresh:
                    set_meta(db, slots=top + len(fresh))
                if self.budget is not None:  # written counts as used: a new item is not the next to go
                    budgets.flush_used(db, dict.fromkeys((k for k, _ in items), time.time_ns()))
        except OSError as e:
            if e.errno in _FULL_DISK:
                raise InputError(f"the disk of token cache {self.path.parent} is full ({e.strerror}) while writing {len(items)} items' "
                                 "tokens; nothing of them was recorded and the cache is as before: free space and run the command again") from e
            raise
        self._pending.clear()
        self._local.memo = None  # this connection's own commit does not change its data_version

    def _make_room(self, ids: list[str], keep: Iterable[str]) -> None:
        """Evict least recently used items so that ``ids`` fit the budget (one commit, before any
        freed slot is written again)."""
        limit = budgets.budget_slots(self.budget, self.bytes_per_item)
        assert limit is not None
        if len(ids) > limit:
            raise InputError(f"token cache {self.path.name}: {len(ids)} items' tokens do not fit its budget of {limit} images "
                             f"({budgets.describe(self.budget)}); raise --token-budget, or ask for fewer candidates")
        with transaction(self._db(), write=True) as db:
            db.execute(budgets.USED_SCHEMA)
            touched, self._touched = self._touched, {}
            budgets.flush_used(db, touched)
            live, _ = slotmap.counts(db)
            need = live + len(ids) - len(slotmap.lookup(db, ids)) - limit
            gone = budgets.victims(db, need, set(keep) | set(ids))
            if len(gone) < need:  # the query's other candidates fill the budget: they go too, never this batch
                taken = {i for i, _ in gone}
                gone += budgets.victims(db, need - len(gone), set(ids) | taken)
            db.executemany("DELETE FROM slots WHERE id = ?", [(i,) for i, _ in gone])
            db.executemany("DELETE FROM used WHERE id = ?", [(i,) for i, _ in gone])
            db.executemany("INSERT INTO free VALUES (?)", [(s,) for _, s in gone])
        if gone:
            self._local.memo = None
            self.evicted += len(gone)
            log.info("token cache %s: evicted %d least recently used items to stay within %s", self.path.name, len(gone),
                     budgets.describe(self.budget))

    def _files_for_writing(self, db: sqlite3.Connection, meta: dict[str, str]) -> SlotFile:
        """The live generation's data files, open for writing (created for a new cache). Only
        inside the write transaction."""
        shape = json.loads(meta["shape"])
        gen = int(meta.get("generation", 0))
        if gen == 0:  # a new cache: its first data files (a crash before the commit leaves strays, replaced next time)
            gen = 1
            self._close_writer()
            self._remove_generations(lambda g: g != 1)  # data files of a map deleted by hand
            self._write_files = SlotFile.create(self._base(gen), self._expect(gen, shape))
            set_meta(db, generation=gen, slots=0)
        elif self._write_files is None or self._write_files.header["generation"] != gen:  # new, or compacted since
            self._close_writer()
            try:
                self._write_files = SlotFile(self._base(gen), self._expect(gen, shape), writable=True)
            except FileNotFoundError as e:
                raise self._files_missing(gen) from e
        return self._write_files

    def _files_missing(self, gen: int) -> IncompatibleError:
        return IncompatibleError(f"token cache {self.path} names data files {self._base(gen).name}.slots/.stamps that are gone; "
                                 f"delete {self.path.name} too and run `mmr cache build`")

    def _close_writer(self) -> None:
        if self._write_files is not None:
            self._write_files.close()
            self._write_files = None

    def delete(self, ids: Iterable[str]) -> None:
        """Remove ``ids`` (absent ones are ignored); their slots become free for later writes.
        Compacts the files when that leaves most of them free (see :data:`COMPACT_FREE_FRACTION`)."""
        ids = list(ids)
        if not ids:
            return
        with transaction(self._db(), write=True) as db:
            for start in range(0, len(ids), slotmap.CHUNK):
                chunk = ids[start : start + slotmap.CHUNK]
                found = slotmap.lookup(db, chunk)
                db.executemany("DELETE FROM slots WHERE id = ?", [(i,) for i in found])
                if self.budget is not None:
                    db.executemany("DELETE FROM used WHERE id = ?", [(i,) for i in found])
                db.executemany("INSERT INTO free VALUES (?)", [(s,) for s, _ in found.values()])
        self._local.memo = None
        self._maybe_compact()

    def keep_only(self, ids: Iterable[str]) -> int:
        """Delete every entry whose id is not in ``ids`` (orphans); returns how many went."""
        keep = set(ids)
        orphans = [i for i in self.ids() if i not in keep]
        self.delete(orphans)
        return len(orphans)

    def _maybe_compact(self) -> None:
        s = self.stats()
        if s["free_slots"] > COMPACT_FREE_FRACTION * (s["live_slots"] + s["free_slots"]) and s["free_bytes"] >= COMPACT_MIN_BYTES:
            log.info("token cache %s: %d of %d slots are free; compacting", self.path.name, s["free_slots"], s["live_slots"] + s["free_slots"])
            self.compact()

    def compact(self) -> dict[str, Any]:
        """Rewrite the live slots, in order, into a new generation of data files and switch the map
        to it in one commit; readers go on reading the old generation until their next lookup (then
        reopen), the old files go after the commit. A slot whose stamp disagrees with its map row
        (damage) is dropped, not copied. Returns bytes before and after and what was dropped."""
        before = self.file_bytes()
        with transaction(self._db(), write=True) as db:
            meta = read_meta(db)
            gen = int(meta.get("generation", 0))
            if gen == 0:
                return {"cache": str(self.path), "compacted": False, "bytes_before": before, "bytes_after": before, "dropped": 0}
            shape = json.loads(meta["shape"])
            self._remove_generations(lambda g: g > gen)  # strays of a compaction that died before its commit
            src = self._open_generation(gen, shape)
            dst = SlotFile.create(self._base(gen + 1), self._expect(gen + 1, shape))
            rows = db.execute("SELECT id, slot, stamp FROM slots ORDER BY slot").fetchall()
            kept, dropped = [], []
            buf = np.empty((1, src.slot_bytes), np.uint8)
            for item_id, slot, stamp in rows:
                if not src.covers(slot + 1) or src.gather(np.array([slot]), np.array([stamp], dtype=np.uint64), buf)[0]:
                    dropped.append(item_id)
                    continue
                dst.write(len(kept), stamp, buf[0].data)
                kept.append((item_id, len(kept), stamp))
            dst.sync()
            dst.close()
            src.close()
            db.execute("DELETE FROM slots")
            db.execute("DELETE FROM free")
            db.executemany("INSERT INTO slots VALUES (?, ?, ?)", kept)
            set_meta(db, generation=gen + 1, slots=len(kept))
        self._close_writer()
        self._local.memo = None
        self._remove_generations(lambda g: g <= gen)
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # best effort: a busy reader only delays it
        if dropped:
            log.warning("token cache %s: %d items whose slots disagreed with the map were dropped (e.g. id %s); "
                        "`mmr cache build` encodes them again", self.path, len(dropped), dropped[0])
        return {"cache": str(self.path), "compacted": True, "bytes_before": before, "bytes_after": self.file_bytes(), "dropped": len(dropped)}

    def _generations(self) -> dict[int, list[Path]]:
        pattern = re.compile(re.escape(self.path.stem) + r"\.g(\d+)\.(slots|stamps)")
        found: dict[int, list[Path]] = {}
        for p in self.path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                found.setdefault(int(m.group(1)), []).append(p)
        return found

    def _remove_generations(self, which) -> None:
        gone = [p for g, paths in self._generations().items() if which(g) for p in paths]
        for p in gone:
            p.unlink(missing_ok=True)
        if gone:
            fsync_dir(self.path)

    # ---- reads -----------------------------------------------------------------------------
    def gather(self, ids: Sequence[str], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The cached arrays of ``ids`` in one contiguous array: ``(tokens [len(ids), *shape] fp16,
        present [len(ids)] bool)``; rows of absent ids are left as they were (``out``, if given:
        a C-contiguous fp16 array of that shape, e.g. a page-locked buffer, is filled in place).
        Only rows the map has committed are seen, and a slot whose stamp is not its row's (being
        rewritten, damaged) is never returned: read again, then IncompatibleError."""
        ids = list(ids)
        n = len(ids)
        shape = self.shape or self._refresh_shape()
        if shape is None:
            return (out if out is not None else np.empty((n, 0), np.float16)), np.zeros(n, bool)
        if out is None:
            out = np.empty((n, *shape), np.float16)
        elif out.dtype != np.float16 or tuple(out.shape) != (n, *shape) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float16 array of shape {(n, *shape)}, not {out.dtype} {out.shape}")
        flat = out.reshape(n, -1).view(np.uint8)
        present = np.zeros(n, bool)
        todo = list(range(n))
        strikes: dict[str, tuple[tuple[int, int], int]] = {}  # id -> (its row, failed reads of that same row)
        for _ in range(_READ_TRIES):
            gen, rows = self._lookup([ids[k] for k in todo])
            if not rows or gen is None:
                self._touch(ids, present)
                return out, present
            confirmed = [k for k in todo if ids[k] in strikes and strikes[ids[k]][0] == rows.get(ids[k]) and strikes[ids[k]][1] >= 3]
            if confirmed:  # the same row failed again and again: no writer is moving it, the files disagree
                todo = confirmed
                break
            pos = np.array([k for k in todo if ids[k] in rows], dtype=np.intp)
            slots = np.array([rows[ids[k]][0] for k in pos], dtype=np.intp)
            stamps = np.array([rows[ids[k]][1] for k in pos], dtype=np.uint64)
            try:
                files = self._readable(gen, shape, int(slots.max()) + 1)
            except FileNotFoundError:  # compacted between the lookup and the open: look up again
                self._local.memo = None
                continue
            if len(pos) == n:
                bad = files.gather(slots, stamps, flat)
            else:
                part = np.empty((len(pos), flat.shape[1]), np.uint8)
                bad = files.gather(slots, stamps, part)
                flat[pos] = part
            present[pos[~bad]] = True
            present[pos[bad]] = False
            todo = pos[bad].tolist()
            if not todo:
                self._touch(ids, present)
                return out, present
            memo = getattr(self._local, "memo", None)
            for k in todo:  # a slot freed and rewritten since the lookup (a writer is busy), or damage: look again
                row, count = strikes.get(ids[k], (None, 0))
                strikes[ids[k]] = (rows[ids[k]], count + 1 if row == rows[ids[k]] else 1)
                if memo is not None:
                    memo[2].pop(ids[k], None)
        raise IncompatibleError(
            f"token cache {self.path}: the slots of {len(todo)} ids (e.g. {ids[todo[0]]}) do not hold what the map says "
            "(the data files were modified outside mmr, or are damaged); `mmr cache compact` drops them and "
            "`mmr cache build` encodes them again"
        )

    def _touch(self, ids: Sequence[str], present: np.ndarray) -> None:
        if self.budget is not None:
            now = time.time_ns()
            self._touched.update((i, now) for i, ok in zip(ids, present) if ok)

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids)] bool: which ids have committed tokens (the map only: no slot is read)."""
        ids = list(ids)
        _, rows = self._lookup(ids)
        return np.array([i in rows for i in ids], dtype=bool)

    def _lookup(self, ids: list[str]) -> tuple[int | None, dict[str, tuple[int, int]]]:
        """(live generation, id -> (slot, stamp)) for the ``ids`` that have rows. A reader keeps
        the rows it looked up (per thread) until SQLite's ``data_version`` says another connection
        committed: the next query over the same candidates skips SQL. A row kept a moment too long
        is harmless: its stamp no longer matches a reused slot, and the read looks again."""
        db = self._db()
        version = db.execute("PRAGMA data_version").fetchone()[0]  # before the lookup: a commit in between only clears more
        memo = getattr(self._local, "memo", None)
        if memo is None or memo[0] != version or len(memo[2]) > _MEMO_MAX:
            memo = self._local.memo = [version, None, {}]
        known = memo[2]
        need = [i for i in ids if i not in known]
        if need or memo[1] is None:
            with transaction(db, write=False) as tx:
                gen = tx.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
                found = slotmap.lookup(tx, need)
            gen = int(gen[0]) if gen else None
            if memo[1] is not None and gen != memo[1]:  # compacted since the kept rows: start over
                self._local.memo = None
                return self._lookup(ids)
            memo[1] = gen
            known.update(found)
            known.update((i, None) for i in need if i not in found)  # absent, until the next commit elsewhere
        return memo[1], {i: known[i] for i in ids if known.get(i) is not None}

    def forget_rows(self) -> None:
        """Drop the id -> slot rows this thread keeps, so the next read looks them up (benchmarks:
        a first read of new candidates)."""
        self._local.memo = None

    def _refresh_shape(self) -> tuple[int, ...] | None:
        held = read_meta(self._db()).get("shape")
        if held:
            self.shape = tuple(json.loads(held))
        return self.shape

    def _open_generation(self, gen: int, shape: Sequence[int]) -> SlotFile:
        try:
            return SlotFile(self._base(gen), self._expect(gen, shape))
        except FileNotFoundError:
            if read_meta(self._db()).get("generation") == str(gen):  # not a compaction racing us: really gone
                raise self._files_missing(gen) from None
            raise

    def _readable(self, gen: int, shape: Sequence[int], need: int) -> SlotFile:
        """The data files of generation ``gen`` mapped to cover slots ``< need`` (opened again when
        the map moved to another generation). A replaced SlotFile is left to the garbage
        collector: another thread may still be copying from its mapping."""
        with self._files_lock:
            files = self._read_files
            if files is None or files.header["generation"] != gen:
                files = self._read_files = self._open_generation(gen, shape)
            if not files.covers(need):
                raise IncompatibleError(
                    f"token data file {files.path} holds {files.slots_on_disk()} slots, but its map {self.path.name} points at slot "
                    f"{need - 1}: the file was cut short (a copy or restore that stopped early?); `mmr cache compact` keeps what is whole "
                    "and drops the rest, `mmr cache build` then encodes those again"
                )
            return files

    def gather_tensor(self, ids: Sequence[str], device: Any = "cpu"):
        """:meth:`gather` as a torch tensor on ``device``: on CUDA the slots are gathered into a
        page-locked host buffer (kept per thread for the next call) and copied to the device once."""
        import torch

        n = len(ids)
        shape = self.shape or self._refresh_shape()
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if not cuda or shape is None:
            arr, present = self.gather(ids)
            return torch.from_numpy(arr).to(device), present
        host = self._pinned((n, *shape))
        arr, present = self.gather(ids, out=host.numpy())
        tensor = host.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._local.pinned_done = done  # the next call waits for this copy before refilling the buffer
        return tensor, present

    def _pinned(self, shape: tuple[int, ...]):
        import torch

        done = getattr(self._local, "pinned_done", None)
        if done is not None:
            done.synchronize()
        buf = getattr(self._local, "pinned", None)
        numel = int(np.prod(shape))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float16, pin_memory=True)
            if numel * 2 <= _KEEP_PINNED_BYTES:
                self._local.pinned = buf
        return buf[:numel].view(shape)

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached arrays of ``ids`` that are present (missing ids are simply absent); the
        arrays are views into one contiguous gather (:meth:`gather`)."""
        arr, present = self.gather(ids)
        return {i: arr[k] for k, i in enumerate(ids) if present[k]}

    def ids(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT id FROM slots")]

    def __len__(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM slots").fetchone()[0])

    @property
    def bytes_per_item(self) -> int:
        """Bytes of one item's array (fp16): one slot."""
        return int(np.prod(self.shape)) * 2 if self.shape else 0

    def stats(self) -> dict[str, Any]:
        """Live and free slots and their bytes, the data files' generation (``mmr cache info``)."""
        with transaction(self._db(), write=False) as db:
            live, free = slotmap.counts(db)
            meta = read_meta(db)
        per = int(np.prod(json.loads(meta["shape"]))) * 2 if "shape" in meta else 0
        bound = tuple(json.loads(meta["budget"])) if meta.get("budget") else None
        return {"live_slots": live, "free_slots": free, "slot_bytes": per, "live_bytes": live * per, "free_bytes": free * per,
                "generation": int(meta.get("generation", 0)), "fill": meta.get("fill", "eager"),
                "budget": budgets.describe(bound) if bound else None}

    def file_bytes(self) -> int:
        """Bytes on disk: the map (with its WAL) and the data files."""
        mine = [p for p in self.path.parent.glob(self.path.name + "*") if p.is_file()]
        mine += [p for paths in self._generations().values() for p in paths]
        return sum(p.stat().st_size for p in mine if p.exists())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        self._close_writer()
        self._read_files = None


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
    """Every token cache (its map file) in a collection's cache folder."""
    return sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}")) if directory.is_dir() else []


def open_existing(path: Path, *, progress: bool | None = None) -> TokenCache:
    """Open a cache file whatever its fingerprint (for maintenance: purge, info, compact)."""
    try:
        with sqlite3.connect(path) as db:
            fingerprint = read_meta(db).get("fingerprint")
    except sqlite3.DatabaseError as e:
        raise IncompatibleError(f"{path} is not a token cache ({e}); delete it (and its .g*.slots files) and run `mmr cache build`") from e
    if fingerprint is None:
        raise IncompatibleError(f"{path} is not a token cache (no fingerprint); delete it and run `mmr cache build`")
    return TokenCache(path, fingerprint, create=False, progress=progress)


def purge(directory: Path, ids: Iterable[str]) -> None:
    """Remove ``ids`` from every token cache of a collection (their slots become free)."""
    ids = list(ids)
    if not ids:
        return
    for path in caches_in(directory):
        cache = open_existing(path)
        cache.delete(ids)
        cache.close()


def compact_all(directory: Path) -> list[dict[str, Any]]:
    """Compact every token cache of a collection (``mmr cache compact``); what each did."""
    out = []
    for path in caches_in(directory):
        cache = open_existing(path)
        out.append(cache.compact())
        cache.close()
    return out


__all__ = [
    "COMPACT_FREE_FRACTION", "FORMAT", "TokenCache", "TokenWriter", "cache_path", "cache_root", "caches_in", "compact_all",
    "data_files", "open_existing", "open_raw_cache", "purge", "raw_cache_path", "raw_fingerprint", "raw_token_writer",
]
