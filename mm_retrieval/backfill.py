"""Backfill a collection's token cache: items indexed before the cache existed (or with
``--no-tokens``), or a reranker trained after indexing.

A reranker's memory is derived from cached raw patch tokens when they exist (no image decoding);
only items with neither are read from disk and encoded again.
"""

from __future__ import annotations

from typing import Any


from .stages.base import encode_files
from .types import Failure


def build_token_cache(pipeline: Any, *, progress: bool | None = None) -> dict[str, Any]:
    """Fill the cache the pipeline's index runs write to; returns what it did."""
    from .pipeline import _progress

    store, encoder = pipeline.store, pipeline.encoder
    store.require()
    encoder.warm_up()
    store.check_compatible(encoder.info())
    writer = pipeline.token_writer()
    cache = writer.cache
    have = set(cache.ids())
    rows = [r for r in store.iter_rows(("id", "path")) if r["id"] not in have]
    from_raw = 0
    reranker = pipeline.reranker
    if rows and reranker is not None and hasattr(reranker, "raw_cache"):
        raw = reranker.raw_cache()
        found = raw.get([r["id"] for r in rows]) if raw is not None else {}
        for start in range(0, len(found), 256):
            keys = list(found)[start : start + 256]
            for k in keys:
                writer.add(k, found[k])
            writer.commit()
        from_raw = len(found)
        rows = [r for r in rows if r["id"] not in found]

    failed: list[Failure] = []
    encoded = 0
    bar = _progress(len(rows), progress)
    try:
        for items, _, tokens in encode_files(encoder, [r["path"] for r in rows], with_tokens=True):
            j = 0
            for it in items:
                if it.error is not None:
                    failed.append(Failure(it.path, it.error))
                    continue
                vec, j = j, j + 1
                if it.id != rows[it.pos]["id"]:
                    failed.append(Failure(it.path, "file changed since it was indexed; run `mmr index` on its folder first"))
                    continue
                writer.add(it.id, tokens[vec])
                encoded += 1
            writer.commit()
            bar.update(len(items))
    finally:
        bar.close()
    return {
        "cache": str(cache.path),
        "fingerprint": cache.fingerprint,
        "from_raw_tokens": from_raw,
        "encoded": encoded,
        "failed": [vars(f) for f in failed],
        "items": len(cache),
        "bytes_per_item": cache.bytes_per_item,
    }


def cache_info(pipeline: Any) -> list[dict[str, Any]]:
    """Every token cache of the collection: fingerprint, items, bytes per item, file size."""
    from .tokencache import caches_in, open_existing

    out = []
    for path in caches_in(pipeline.store.cache_dir()):
        c = open_existing(path)
        out.append({"path": str(path), "fingerprint": c.fingerprint, "items": len(c), "bytes_per_item": c.bytes_per_item,
                    "shape": list(c.shape) if c.shape else None, "file_bytes": c.file_bytes()})
        c.close()
    return out


__all__ = ["build_token_cache", "cache_info"]
