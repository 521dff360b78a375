"""Part of suite ``rerank``: reading the candidates' tokens (issue 24 item 4).

**Token read**: 100 candidates' arrays out of a cache of many, for a 12 KiB slot (ViT-B-32 reranker
memory, 49 x 128 fp16) and an 886 KB slot (BLIP-base vision tokens, 577 x 768 fp16), through
:meth:`~mm_retrieval.tokencache.TokenCache.gather` (memory-mapped slots) against the SQLite blobs
the store replaced (format 1: ``SELECT ... WHERE id IN (...)``, one blob per id, stacked into one
array, the connection kept open), with a numpy copy of the same bytes (one contiguous array into
another) as the machine's limit. The same candidates are read each round, so the reader's kept
id -> slot rows answer the lookup; ``..._rows_looked_up`` drops them first (new candidates). All interleaved; the files were just written, so both stores
read from the page cache (a serving process's steady state), not from the disk. On CUDA the
memory-mapped read also goes to the device (page-locked buffer, one copy) against a
host-to-device copy of the same bytes.

**Own reranker before/after**: the ``reranker/cross_attention`` stage's whole rerank call at 100
candidates with its memory read as before (a SQLite-blob cache opened per query, as the stage
did) and as now (one kept instance, one gather), interleaved.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from .timing import figure, interleaved, summary

SLOTS = {"12KiB_memory": (49, 128), "886KB_blip": (577, 768)}


class BlobCache:
    """The SQLite-blob token cache (format ``mm_retrieval.tokens/1``) as it wrote and read, kept
    here as the reference the memory-mapped store is measured against."""

    def __init__(self, path: Path, fingerprint: str = "bench", shape: tuple[int, ...] | None = None):
        self.db = sqlite3.connect(path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, data BLOB NOT NULL)")
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "mm_retrieval.tokens/1"), ("fingerprint", fingerprint),
                                                                      ("shape", json.dumps(list(shape or ())))])
                meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self.shape = tuple(json.loads(meta["shape"]))

    def write(self, items: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?)",
                                [(k, np.ascontiguousarray(v, dtype=np.float16).tobytes()) for k, v in items.items()])

    def get(self, ids: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT id, data FROM tokens WHERE id IN ({','.join('?' * len(chunk))})"
            for item_id, blob in self.db.execute(q, chunk):
                out[item_id] = np.frombuffer(blob, dtype=np.float16).reshape(self.shape)
        return out

    def stacked(self, ids: list[str]) -> np.ndarray:
        got = self.get(ids)
        return np.stack([got[i] for i in ids])

    def close(self) -> None:
        self.db.close()


def token_read(workdir: Path, device: str, quick: bool = False) -> dict[str, Any]:
    """Memory-mapped gather vs SQLite blobs vs a numpy copy, per slot size (see the module doc)."""
    n = 16 if quick else 100
    rounds = 3 if quick else 30
    root = workdir / "token-read"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out: dict[str, Any] = {"candidates": n, "rounds": rounds, "note": "warm page cache; interleaved; the copy is the limit", "slots": {}}
    try:
        for name, shape in SLOTS.items():
            out["slots"][name] = _one_slot_size(root, name, shape, n, rounds, device, quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _one_slot_size(root: Path, name: str, shape: tuple[int, ...], n: int, rounds: int, device: str, quick: bool) -> dict[str, Any]:
    from ..tokencache import TokenCache

    rng = np.random.default_rng(0)
    slot = int(np.prod(shape)) * 2
    items = 2 * n if quick else max(2 * n, min(2000, (256 << 20) // slot))  # <= ~256 MB per store
    mm = TokenCache(root / f"{name}.sqlite", f"bench-{name}")
    blobs = BlobCache(root / f"{name}-blobs.sqlite", shape=shape)
    ids = [format(i, "032x") for i in range(items)]
    for start in range(0, items, 64):
        batch = {i: rng.standard_normal(shape).astype(np.float16) for i in ids[start : start + 64]}
        for k, v in batch.items():
            mm.add(k, v)
        mm.commit()
        blobs.write(batch)
    pick = [ids[i] for i in rng.choice(items, n, replace=False)]
    reader = TokenCache(mm.path, mm.fingerprint, create=False)  # a reader of its own, as a search process has
    into = np.empty((n, *shape), np.float16)
    src, dst = np.ascontiguousarray(reader.gather(pick)[0]), np.empty((n, *shape), np.float16)
    if not np.array_equal(src, blobs.stacked(pick)):
        raise AssertionError("bench token_read: the memory-mapped store and the SQLite blobs disagree")
    def first_time():  # candidates this reader has not looked up since the last write: the map is read (SQL)
        reader.forget_rows()
        return reader.gather(pick, out=into)

    fns = {
        "memmap_gather": lambda: reader.gather(pick),
        "memmap_gather_into_buffer": lambda: reader.gather(pick, out=into),
        "memmap_gather_into_buffer_rows_looked_up": first_time,
        "sqlite_blobs": lambda: blobs.stacked(pick),
        "numpy_copy": lambda: np.copyto(dst, src),
    }
    if device.startswith("cuda"):
        import torch

        host = torch.from_numpy(src).pin_memory()
        fns["memmap_to_device"] = lambda: reader.gather_tensor(pick, device)
        fns["host_to_device_copy"] = lambda: host.to(device, non_blocking=True)
    stats = {k: summary(v) for k, v in interleaved(fns, rounds, device, warmup=2).items()}
    p50 = {k: s["p50_ms"] for k, s in stats.items()}
    mb = n * slot / 1e6
    doc = {
        "slot_bytes": slot, "items_in_store": items, "bytes_read": n * slot, **stats,
        "memmap_vs_sqlite": figure(p50["memmap_gather"], "ms p50", "SQLite blobs, p50", p50["sqlite_blobs"],
                                   ratio_is="memmap / sqlite (below 1: faster)"),
        "memmap_into_buffer_vs_sqlite": figure(p50["memmap_gather_into_buffer"], "ms p50", "SQLite blobs, p50", p50["sqlite_blobs"],
                                               ratio_is="memmap into a kept buffer / sqlite"),
        # like for like: the copy, like a gather into a kept buffer (BLIP's page-locked one), allocates nothing
        "memmap_vs_copy_limit": figure(p50["memmap_gather_into_buffer"], "ms p50", "numpy copy of the same bytes, p50", p50["numpy_copy"],
                                       ratio_is="memmap into a kept buffer / copy (1 = at the limit)"),
        "gb_per_s": {k: round(mb / 1e3 / (v / 1e3), 2) for k, v in p50.items() if v > 0},
    }
    if "memmap_to_device" in p50:
        doc["to_device_vs_copy_limit"] = figure(p50["memmap_to_device"], "ms p50", "host-to-device copy of the same bytes (pinned), p50",
                                                p50["host_to_device_copy"], ratio_is="gather+copy / copy")
    for c in (reader, mm):
        c.close()
    blobs.close()
    return doc


def own_rerank(setup: Any, hits: list[Any], new_query: Any, rounds: int) -> dict[str, Any]:
    """The own reranker's rerank call on ``hits``: memory read as before (SQLite blobs, a cache
    opened per query) vs now (memory-mapped gather), interleaved. ``setup``: the rerank suite's
    (an indexed collection whose reranker memory is cached); ``new_query()``: a fresh query."""
    reranker = setup.reranker
    n = len(hits)
    ids = [h.id for h in hits]
    path = setup.pipe.store.cache_dir() / "bench-blobs.sqlite"
    path.unlink(missing_ok=True)
    now = reranker.memories(ids)
    old = BlobCache(path, shape=now.shape[1:])
    old.write(dict(zip(ids, now)))
    old.close()

    def before() -> np.ndarray:  # the stage's memories() before: a cache opened per query, blobs stacked
        cache = BlobCache(path)
        try:
            return cache.stacked(ids)
        finally:
            cache.close()

    def rerank_before():
        import torch

        # instance attributes: shadow the methods for this call only (on CUDA the stage reads through the second)
        reranker.memories = lambda _ids: before()
        reranker.memories_on_device = lambda _ids: torch.from_numpy(before()).to(reranker.device)
        try:
            return reranker.rerank(new_query(), hits, 10)
        finally:
            del reranker.memories, reranker.memories_on_device

    assert np.array_equal(before(), now)
    samples = interleaved({
        "read_before": before,
        "read_now": lambda: reranker.memories(ids),
        "rerank_before": rerank_before,
        "rerank_now": lambda: reranker.rerank(new_query(), hits, 10),
    }, rounds, reranker.device, warmup=1)
    stats = {k: summary(v) for k, v in samples.items()}
    path.unlink(missing_ok=True)
    return {
        "candidates": n, **stats,
        "read_gain": figure(stats["read_now"]["p50_ms"], "ms p50", "SQLite blobs, cache opened per query, p50",
                            stats["read_before"]["p50_ms"], ratio_is="now / before"),
        "rerank_gain": figure(stats["rerank_now"]["p50_ms"], "ms p50", "rerank with the SQLite-blob read, p50",
                              stats["rerank_before"]["p50_ms"], ratio_is="now / before"),
    }


def summary_lines(rr: dict[str, Any]) -> list[str]:
    """The human report's lines for this part of the rerank suite."""
    lines = []
    if tr := rr.get("token_read"):
        for name, d in tr["slots"].items():
            lines.append(f"        token read of {tr['candidates']} x {d['slot_bytes']:,} B ({name}): memmap {d['memmap_gather']['p50_ms']:.3f} ms "
                         f"(into a kept buffer {d['memmap_gather_into_buffer']['p50_ms']:.3f}) vs SQLite blobs {d['sqlite_blobs']['p50_ms']:.3f} ms "
                         f"({1 / d['memmap_vs_sqlite']['ratio']:.1f}x / {1 / d['memmap_into_buffer_vs_sqlite']['ratio']:.1f}x faster; "
                         f"{d['memmap_gather_into_buffer_rows_looked_up']['p50_ms']:.3f} ms for candidates whose rows are looked up); numpy copy of "
                         f"the same bytes {d['numpy_copy']['p50_ms']:.3f} ms (the kept-buffer gather at {d['memmap_vs_copy_limit']['ratio']:.2f}x the limit)")
    if own := rr.get("own_rerank_store"):
        lines.append(f"        own reranker at {own['candidates']}: memory read {own['read_before']['p50_ms']:.2f} -> {own['read_now']['p50_ms']:.2f} ms, "
                     f"rerank p50 {own['rerank_before']['p50_ms']:.2f} -> {own['rerank_now']['p50_ms']:.2f} ms (SQLite blobs -> memmap)")
    return lines
