"""Train/val split, the first stage over each side, hard-negative pools and ranking metrics.

The first stage is the cosine similarity over a side's gallery. A caption's relevant images are its
row's image and every image whose row has the identical caption; its *hard pool* is the
``hard_pool`` best-ranked images that are not relevant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mm_retrieval.errors import InputError

if TYPE_CHECKING:
    import torch

    from mm_retrieval.training.reranker.data import Features

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


@dataclass
class Split:
    """One side of the split: its gallery, its unique captions and the first stage over them."""

    images: torch.Tensor  # [n] global image ids (the gallery)
    queries: torch.Tensor  # [q] global caption ids (each unique caption once)
    relevant: torch.Tensor  # [q, n] bool: caption i describes gallery image j (identical captions)
    sims: torch.Tensor  # [q, n] first-stage cosine similarity
    row_query: torch.Tensor  # [r] local query index of each row
    row_image: torch.Tensor  # [r] local gallery index of each row


def split(feats: Features, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded train/val split by unit (group or image); each side gets its own gallery."""
    import numpy as np
    import torch

    units = sorted(set(feats.row_unit))
    if len(units) < 2:
        raise InputError(
            f"only {len(units)} image/group in the table: a reranker needs at least 2 to hold one "
            "out for validation (and many more to learn anything)"
        )
    n_val = min(len(units) - 1, max(1, round(val_fraction * len(units))))
    perm = np.random.default_rng(seed).permutation(len(units))
    val_units = {units[i] for i in perm[:n_val]}
    is_val = torch.tensor([u in val_units for u in feats.row_unit])
    # Val captions search the whole table's images, as at inference: a val gallery of its own few
    # images would be far easier than a collection, and would not show whether the reranker fixes
    # the first stage's mistakes against images it was trained on.
    return _side(feats, ~is_val), _side(feats, is_val, gallery=feats.row_image)


def _side(feats: Features, rows: torch.Tensor, gallery: torch.Tensor | None = None) -> Split:
    """The split of ``rows``; its gallery is their images, or the images in ``gallery``."""
    import torch

    r_img, r_cap = feats.row_image[rows], feats.row_caption[rows]
    if gallery is None:
        images, row_image = torch.unique(r_img, return_inverse=True)
    else:
        images = torch.unique(gallery)
        row_image = torch.searchsorted(images, r_img)
    queries, row_query = torch.unique(r_cap, return_inverse=True)
    relevant = torch.zeros(len(queries), len(images), dtype=torch.bool)
    relevant[row_query, row_image] = True
    if gallery is not None:  # an identical caption on a gallery image outside ``rows`` counts too
        same = torch.isin(feats.row_caption, queries)  # queries and images are sorted (torch.unique)
        relevant[torch.searchsorted(queries, feats.row_caption[same]),
                 torch.searchsorted(images, feats.row_image[same])] = True
    sims = feats.text_emb[queries] @ feats.image_emb[images].T
    return Split(images, queries, relevant, sims, row_query, row_image)


def negative_counts(train: Split, negatives: int, hard_pool: int) -> tuple[int, int]:
    """(negatives, pool) capped so that every training caption has that many non-relevant images."""
    available = len(train.images) - int(train.relevant.sum(1).max())
    if available < 1:
        raise InputError(
            "the training split has no negative images (every image matches every caption); "
            "a reranker needs captions that describe different images"
        )
    pool = min(hard_pool, available)
    n_neg = min(negatives, pool)
    if n_neg < negatives:
        logger.warning("train-reranker: only %d negatives per caption available (asked for %d)",
                       n_neg, negatives)
    return n_neg, pool


def hard_pools(split: Split, pool: int) -> torch.Tensor:
    """[q, pool] gallery indices of each caption's best-ranked non-relevant images."""
    import torch

    masked = split.sims.masked_fill(split.relevant, float("-inf"))
    return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :pool].contiguous()


def recall(ranking: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    """R@k and MRR from rankings [q, n] (gallery indices, best first) and relevance [q, n]."""
    import torch

    hit = relevant.gather(1, ranking)  # [q, n] bool in rank order
    first = hit.to(torch.uint8).argmax(1).double()  # every val caption has a relevant image
    out = {f"R@{k}": float((first < k).double().mean()) for k in RECALL_AT}
    out["MRR"] = float((1.0 / (first + 1)).mean())
    return out
