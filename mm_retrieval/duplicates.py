"""Near-duplicate groups of a collection (``mmr duplicates``), and the backfill of the hashes they need.

Candidate pairs come from the index, never from all pairs: each image's vector is searched for
its nearest ``neighbours`` (those with a similarity of at least
:data:`~mm_retrieval.neardup.MIN_SIMILARITY`), and a candidate is kept when the perceptual hashes agree too
(:func:`~mm_retrieval.neardup.same_photo`). Pairs are joined into groups (a chain of near copies
is one group). Per group one item is suggested to keep: the largest (pixels, then bytes), then
the oldest (``taken``, then the file's time). Nothing is deleted or moved here.

Items indexed before hashes were stored get them from :func:`backfill_hashes` (each file read and
decoded once, its row rewritten with the same vector: no model runs, nothing is re-indexed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decode import (
    content_hash,
    decode_image,
    is_video,
    item_id,
    read_or_reason,
    read_regular_file,
)
from .errors import InputError
from .locks import CollectionLock
from .neardup import (
    MAX_HASH_DISTANCE,
    MIN_SIMILARITY,
    PHASH_KEY,
    UnionFind,
    hash_distance,
    image_phash,
    same_photo,
    valid_hash,
)
from .progress import progress_bar
from .stages.base import Store
from .types import Failure

log = logging.getLogger(__name__)

NEIGHBOURS = 16  # candidates per item: bursts and copies beyond this are still joined through chains
_BATCH = 64  # query vectors per search call
BACKFILL_HINT = "run `mmr duplicates --backfill` to add them (reads and hashes each file once; nothing is re-indexed)"


@dataclass
class DuplicateGroup:
    """Items that are copies of one photo; ``keep`` is the suggested one (an id of ``items``)."""

    keep: str
    items: list[dict[str, Any]]  # id, path, width, height, file_size, taken; best first
    max_distance: int = 0  # the largest hash distance of a pair that joined the group
    min_similarity: float = 1.0  # the lowest vector similarity of such a pair


@dataclass
class DuplicateReport:
    groups: list[DuplicateGroup] = field(default_factory=list)
    images: int = 0  # image items looked at
    unhashed: int = 0  # image items without a hash (not grouped)
    min_similarity: float = MIN_SIMILARITY
    max_distance: int = MAX_HASH_DISTANCE

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "unhashed": self.unhashed, "min_similarity": self.min_similarity,
                "max_distance": self.max_distance, "duplicates": sum(len(g.items) - 1 for g in self.groups),
                "groups": [vars(g) for g in self.groups]}


class HashesMissing(InputError):
    """The collection's images have no perceptual hashes (indexed before they were stored)."""


def _is_image(row: dict[str, Any]) -> bool:
    return bool(row.get("path")) and not is_video(row["path"]) and row.get("has_image", True) is not False


def find_groups(store: Store, *, min_similarity: float = MIN_SIMILARITY, max_distance: int = MAX_HASH_DISTANCE,
                neighbours: int = NEIGHBOURS, filter: str = "", progress: bool | None = None) -> DuplicateReport:
    """The near-duplicate groups among ``store``'s images (matching ``filter``), largest group
    first. Raises :class:`HashesMissing` when no image has a hash; images without one are
    counted in ``unhashed`` and left out."""
    if not 0 <= max_distance <= 64:
        raise InputError(f"--max-distance must be 0..64 bits, got {max_distance}")
    rows, pairs = candidate_pairs(store, min_similarity=min_similarity, neighbours=neighbours, filter=filter, progress=progress)
    hashed = sum(1 for r in rows.values() if r["phash"] is not None)
    report = DuplicateReport(images=len(rows), unhashed=len(rows) - hashed, min_similarity=min_similarity,
                             max_distance=max_distance)
    uf = UnionFind()
    joined = []
    for a, b, sim, d in pairs:
        if same_photo(sim, d, min_similarity=min_similarity, max_distance=max_distance):
            uf.union(a, b)
            joined.append((a, d, sim))
    by_root: dict[str, list[tuple[int, float]]] = {}
    for a, d, sim in joined:
        by_root.setdefault(uf.find(a), []).append((d, sim))
    for members in uf.groups():
        items = sorted((_describe(rows[i]) for i in members), key=_keep_order)
        found = by_root.get(uf.find(members[0]), [])
        report.groups.append(DuplicateGroup(keep=items[0]["id"], items=items,
                                            max_distance=max((d for d, _ in found), default=0),
                                            min_similarity=round(min((s for _, s in found), default=1.0), 4)))
    report.groups.sort(key=lambda g: (-len(g.items), g.items[0]["path"]))
    return report


def candidate_pairs(store: Store, *, min_similarity: float = MIN_SIMILARITY, neighbours: int = NEIGHBOURS, filter: str = "",
                    progress: bool | None = None) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, float, int]]]:
    """The image rows of ``store`` (by id, each with its ``phash`` or None) and the candidate
    pairs ``(a, b, similarity, hash distance)`` the index gives: each hashed image's nearest
    ``neighbours`` with a vector similarity of at least ``min_similarity`` (each pair once).
    Raises :class:`HashesMissing` when no image has a hash."""
    if not -1.0 <= min_similarity <= 1.0:
        raise InputError(f"--min-similarity must be a cosine in -1..1, got {min_similarity}")
    if neighbours < 1:
        raise InputError(f"--neighbours must be at least 1, got {neighbours}")
    store.require()
    rows = {}
    for r in store.iter_rows(("id", "path", "vector", "metadata", "file_size", "mtime_ns"), filter):
        if _is_image(r):
            h = (r.get("metadata") or {}).get(PHASH_KEY)
            r["phash"] = h if valid_hash(h) else None
            rows[r["id"]] = r
    ids = [i for i, r in rows.items() if r["phash"] is not None]
    if rows and not ids:
        raise HashesMissing(f"none of the {len(rows)} images in collection {store.name!r} has a perceptual hash "
                            f"(it was indexed before they were stored): {BACKFILL_HINT}")
    pairs: dict[tuple[str, str], tuple[str, str, float, int]] = {}
    bar = progress_bar(len(ids), progress)
    try:
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            vectors = np.asarray([rows[i]["vector"] for i in chunk], dtype=np.float32)
            # top-k, not a range search: on Milvus Lite a range search took 3x as long
            for a, hits in zip(chunk, store.neighbour_ids(vectors, neighbours + 1, filter)):
                for b, score in hits:
                    key = (min(a, b), max(a, b))
                    if b == a or key in pairs or score < min_similarity or rows.get(b, {}).get("phash") is None:
                        continue
                    pairs[key] = (key[0], key[1], float(score), hash_distance(rows[a]["phash"], rows[b]["phash"]))
            bar.update(len(chunk))
    finally:
        bar.close()
    return rows, list(pairs.values())


def _describe(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata") or {}
    return {"id": row["id"], "path": row["path"], "width": meta.get("width"), "height": meta.get("height"),
            "file_size": int(row.get("file_size") or 0), "taken": meta.get("taken"), "mtime_ns": int(row.get("mtime_ns") or 0)}


def _keep_order(item: dict[str, Any]) -> tuple:
    """Largest first (pixels, then bytes), then oldest (``taken``, then file time), then path."""
    pixels = (item["width"] or 0) * (item["height"] or 0) if isinstance(item["width"], int) and isinstance(item["height"], int) else 0
    taken = item["taken"] if isinstance(item["taken"], str) else "\uffff"  # unknown: last
    return (-pixels, -item["file_size"], taken, item["mtime_ns"] or 1 << 62, item["path"])


def backfill_hashes(store: Store, *, progress: bool | None = None) -> dict[str, Any]:
    """Add the perceptual hash to every image row of ``store`` that lacks one: its file is read
    and decoded (no model), and the row is rewritten with the same vectors. A file that is gone
    or whose content changed since it was indexed is reported in ``failed`` and left as it is.
    Takes the collection's write lock (an index run and a backfill don't interleave)."""
    store.require()
    with CollectionLock(store.cache_dir(), store.name):
        todo = [r for r in store.iter_rows(("id", "path", "metadata", "has_image")) if _is_image(r)
                and not valid_hash((r.get("metadata") or {}).get(PHASH_KEY))]
        fields = ["id", "path", "content_hash", "caption", "metadata", "file_size", "mtime_ns", "has_image", "has_text", "vector"]
        if store.has_text_vectors():
            fields.append("text_vector")
        if store.has_media_fields():
            fields += ["media_id", "start", "end", "frame", "segments"]
        failed: list[Failure] = []
        hashed = 0
        bar = progress_bar(len(todo), progress)
        try:
            for start in range(0, len(todo), 256):
                chunk = todo[start : start + 256]
                full = {r["id"]: r for r in store.get([r["id"] for r in chunk], fields)}
                rows = []
                for r in chunk:
                    phash, why = _hash_file(r)
                    if why is not None:
                        failed.append(Failure(r["path"], why))
                        continue
                    row = dict(full[r["id"]])
                    if not row.get("has_text"):
                        row["text_vector"] = None  # the stored zero vector means "no text"
                    row["metadata"] = {**(row.get("metadata") or {}), PHASH_KEY: phash}
                    rows.append(row)
                store.upsert(rows)
                hashed += len(rows)
                bar.update(len(chunk))
        finally:
            bar.close()
        if hashed:
            store.flush()
    return {"collection": store.name, "hashed": hashed, "failed": [vars(f) for f in failed]}


def _hash_file(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(hash, None), or (None, why) for a file that can't give the indexed item's hash."""
    data, why = read_or_reason(lambda: read_regular_file(row["path"]))
    if why is not None:
        return None, why
    if item_id(content_hash(data)) != row["id"]:
        return None, "file changed since it was indexed; run `mmr index` on its folder first"
    from .decode import DecodeError, is_raw

    try:
        image = decode_image(data, raw=is_raw(row["path"]))
    except DecodeError as e:
        return None, str(e)
    phash = image_phash(image)
    return (phash, None) if phash is not None else (None, "the image could not be hashed")


__all__ = ["BACKFILL_HINT", "DuplicateGroup", "DuplicateReport", "HashesMissing", "backfill_hashes", "candidate_pairs", "find_groups"]
