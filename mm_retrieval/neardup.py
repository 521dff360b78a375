"""Near-duplicate primitives: an image's perceptual hash, and when two items are copies of one photo.

The hash is ``imagehash``'s pHash (the signs of an 8x8 block of low DCT frequencies of the
greyscale picture against their median: 64 bits) of the image as displayed (EXIF orientation
applied), computed where the image is decoded anyway. It is stored under :data:`PHASH_KEY` in the
item's JSON ``metadata`` (not a new schema field: every existing collection can hold it, and
``mmr duplicates --backfill`` adds it to items indexed before it existed, without a re-index).

Its value is 64 hex digits: the pHash of the picture turned by 0, 90, 180 and 270 degrees (16
digits each, hashed from the same 32x32 thumbnail, so the extra three cost four tiny DCTs), so
that a copy turned a quarter is as close as the original (:func:`hash_distance`).

Two items are the same photo (:func:`same_photo`) when both agree: their image vectors are close
(cosine >= :data:`MIN_SIMILARITY`) **and** their hashes are (Hamming <= :data:`MAX_HASH_DISTANCE`
of 64 bits). Either alone is not enough: different shots of one subject have close vectors,
and flat or dark pictures have close hashes. The thresholds are measured by ``mmr bench dupes``
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

PHASH_KEY = "phash"  # the reserved metadata key
MAX_HASH_DISTANCE = 14  # bits of 64: the best F1 of `mmr bench --suite dupes` (benchmarks/RESULTS.md)
MIN_SIMILARITY = 0.80  # cosine of the image vectors: a guard (copies measured >= 0.95 with the demo model)
_HEX = 16  # hex digits per orientation's hash

T = TypeVar("T")


def image_phash(im: Any) -> str | None:
    """The hash of a decoded PIL image (as displayed): 64 hex digits, the pHash at 0/90/180/270
    degrees. None when the image can't be hashed (never raises: a hash is never worth a file).

    Pass the smallest image at hand that still has 64 px on its shorter side (the indexer hashes
    the model's resized input, :class:`mm_retrieval.decode.ImageFileDataset`): reducing a full
    3 MP photo to the 32x32 thumbnail is most of the cost (~12 ms), the hash itself ~0.1 ms."""
    try:
        import numpy as np
        from PIL import Image

        if im.mode not in ("L", "RGB", "RGBA", "I", "F"):
            im = im.convert("RGB")
        # reducing_gap: a box reduction first, so a 12 MP photo is not Lanczos-filtered whole
        small = np.asarray(im.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0).convert("L"))
        return "".join(_phash_hex(np.rot90(small, k)) for k in range(4))
    except Exception:  # noqa: BLE001
        return None


def _phash_hex(pixels: Any) -> str:
    """``str(imagehash.phash(image))`` of a 32x32 greyscale thumbnail given as its uint8 array,
    bit for bit (the same DCT, median and bit order; stored hashes stay comparable), without
    imagehash's per-call image conversions, which cost more than the DCT itself."""
    import numpy as np
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(np.ascontiguousarray(pixels), axis=0), axis=1)[:8, :8]
    return np.packbits(dct > np.median(dct)).tobytes().hex()


def valid_hash(value: Any) -> bool:
    """Whether ``value`` is a hash as :func:`image_phash` writes it."""
    if not isinstance(value, str) or len(value) != 4 * _HEX:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


def hash_distance(a: str, b: str) -> int:
    """Bits (of 64) that differ between ``a`` as displayed and ``b`` turned whichever quarter
    matches best."""
    x = int(a[:_HEX], 16)
    return min((x ^ int(b[i : i + _HEX], 16)).bit_count() for i in range(0, 4 * _HEX, _HEX))


def same_photo(similarity: float, distance: int, *, min_similarity: float = MIN_SIMILARITY,
               max_distance: int = MAX_HASH_DISTANCE) -> bool:
    """The pair rule: vectors close and hashes close."""
    return similarity >= min_similarity and distance <= max_distance


class UnionFind:
    """Groups from pairs (path halving)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        p = self.parent.setdefault(x, x)
        while p != self.parent[p]:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        self.parent[x] = p
        return p

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[str]]:
        """Sets of two or more, members in insertion order."""
        out: dict[str, list[str]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [g for g in out.values() if len(g) > 1]


def collapse(hits: Sequence[T], key: Callable[[T], str], vectors: dict[str, Any], hashes: dict[str, str], *,
             min_similarity: float = MIN_SIMILARITY, max_distance: int = MAX_HASH_DISTANCE,
             hidden: dict[str, int] | None = None) -> list[T]:
    """``hits`` (best first) with every hit dropped that is the same photo (:func:`same_photo`)
    as a better one kept, directly or through a chain; ``vectors``/``hashes``: by id (an item
    without a hash is never collapsed). ``hidden``, when given, gets each kept hit's key -> how
    many hits it stands for were dropped (only keys that dropped some)."""
    import numpy as np

    ids = [key(h) for h in hits]
    have = [i for i in dict.fromkeys(ids) if i in vectors and valid_hash(hashes.get(i))]
    uf = UnionFind()
    if len(have) > 1:
        m = np.asarray([vectors[i] for i in have], dtype=np.float32)
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        sims = m @ m.T
        for a in range(len(have)):
            for b in range(a + 1, len(have)):
                if sims[a, b] >= min_similarity and same_photo(
                    float(sims[a, b]), hash_distance(hashes[have[a]], hashes[have[b]]),
                    min_similarity=min_similarity, max_distance=max_distance,
                ):
                    uf.union(have[a], have[b])
    kept, seen = [], {}
    for h, i in zip(hits, ids):
        root = uf.find(i) if i in uf.parent else i
        if root in seen:
            if hidden is not None and seen[root] != i:
                hidden[seen[root]] = hidden.get(seen[root], 0) + 1
            continue
        seen[root] = i
        kept.append(h)
    return kept

