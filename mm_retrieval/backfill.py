"""Backfill a collection's token cache: items indexed before the cache existed (or with
``--no-tokens``), or a reranker trained (or chosen) after indexing.

A reranker's memory is derived from cached raw patch tokens when they exist (no image decoding);
only items with neither are read from disk and encoded again. A reranker with its own image side
(BLIP: its tokens cannot be derived from the first-stage encoder's) always reads the images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .decode import is_video
from .encoding import ImageEncoding, encode_files, segment_tokens
from .progress import progress_bar
from .stages.base import Encoder, ImageSide, Store
from .tokencache import caches_in, open_existing, open_raw_cache
from .types import Failure

if TYPE_CHECKING:
    from .tokencache import TokenWriter


def build_token_cache(encoder: Encoder, store: Store, writer: TokenWriter, *, image_side: ImageSide | None = None,
                      progress: bool | None = None) -> dict[str, Any]:
    """Write tokens through ``writer`` (see :meth:`Pipeline.token_writer`) for every image item
    of ``store``'s collection its cache lacks; ``image_side``: the reranker's own image encoder
    (:meth:`Pipeline.image_side`), whose tokens ``writer`` takes instead of the encoder's.
    Returns what it did."""
    store.require()
    encoder.warm_up()
    store.check_compatible(encoder.info())
    cache = writer.cache
    have = set(cache.ids())
    rows = [r for r in store.iter_rows(("id", "path")) if r["id"] not in have and r["path"]]  # text-only items have no image
    from_raw = 0
    raw = open_raw_cache(store.cache_dir(), encoder.fingerprint) if rows and image_side is None else None
    if raw is not None and raw.path != cache.path:  # a reranker's memory, derived from raw tokens
        found = raw.get([r["id"] for r in rows])
        keys = list(found)
        for start in range(0, len(keys), 256):
            for k in keys[start : start + 256]:
                writer.add(k, found[k])
            writer.commit()
        raw.close()
        from_raw = len(found)
        rows = [r for r in rows if r["id"] not in found]

    failed: list[Failure] = []
    encoded = 0
    encoding = ImageEncoding(encoder, tokens=True, image_side=image_side)
    videos = [r for r in rows if is_video(r["path"])]  # a segment's tokens come from its representative frame
    if videos:
        rows = [r for r in rows if not is_video(r["path"])]
        extra = {r["id"]: r for r in store.get([r["id"] for r in videos], ["frame", "content_hash"])}
        for row, tok, err in segment_tokens(encoding, [{**r, **extra.get(r["id"], {})} for r in videos]):
            if err is not None:
                failed.append(Failure(row["path"], err))
            else:
                writer.add(row["id"], tok)
                encoded += 1
        writer.commit()
    bar = progress_bar(len(rows), progress)
    try:
        paths = [r["path"] for r in rows]
        for batch in encode_files(encoding, paths):
            for it, _, tokens in batch:
                if it.error is not None:
                    failed.append(Failure(it.path, it.error))
                elif it.id != rows[it.pos]["id"]:
                    failed.append(Failure(it.path, "file changed since it was indexed; run `mmr index` on its folder first"))
                else:
                    writer.add(it.id, tokens)
                    encoded += 1
            writer.commit()
            bar.update(len(batch))
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


def cache_info(store: Store) -> list[dict[str, Any]]:
    """Every token cache of ``store``'s collection: fingerprint, items, bytes per item, live and
    free slots (``slots``: see :meth:`TokenCache.stats`), file size."""
    out = []
    for path in caches_in(store.cache_dir()):
        c = open_existing(path)
        doc = {"path": str(path), "fingerprint": c.fingerprint, "items": len(c), "bytes_per_item": c.bytes_per_item,
               "shape": list(c.shape) if c.shape else None, "slots": c.stats(), "file_bytes": c.file_bytes()}
        if c.info is not None:  # what the writer said the arrays hold (e.g. BLIP: real tokens/width, storage)
            doc["info"] = c.info
        out.append(doc)
        c.close()
    return out


__all__ = ["build_token_cache", "cache_info"]
