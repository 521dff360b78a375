"""Reranking hybrid candidates without losing what the text vectors found.

A hybrid first stage fuses two legs: the query against the image vectors and against the items'
text vectors (captions, titles). The reranker only sees the image side (text tokens attend to
image patches), so ordering hybrid candidates by its score alone would throw the text leg away:
on a captioned collection, where the captions carry most of the evidence, that is far worse than
not reranking at all. Instead the reranker *replaces the image leg*, and its order is fused with
the text leg by the same ranker the hybrid search used (Milvus' RRF or weighted). A reranker
that ranks exactly like the image vectors therefore gives back the hybrid order; a better one
improves on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mm_retrieval.errors import InputError
from mm_retrieval.types import Hit

__all__ = ["apply_rerank_scores", "fuse_legs"]


def apply_rerank_scores(hits: Sequence[Hit], scores: Sequence[float], k: int, *, mode: str, search: Any,
                        unscored: Callable[[str], str | None] | None = None) -> list[Hit]:
    """Order first-stage ``hits`` by the reranker's ``scores`` (one per hit) and keep the top ``k``.

    ``mode="image"``: the reranker's order; each hit's ``score`` is the reranker's.
    ``mode="hybrid"``: the reranker's scores fused with the hits' ``text_score`` (see the module
    docstring) using ``search.hybrid_ranker`` / ``search.hybrid_weights`` / ``search.rrf_k``; each
    hit's ``score`` is then the fused score. In both, ``rerank_score`` is the reranker's own. Ties
    keep the first-stage order; ranks are renumbered from 1; ``retrieval_score`` stays the first stage's.

    A NaN score is a candidate the reranker could not score (e.g. its file is gone and its tokens
    were never computed): it is kept, not dropped, with its first-stage score, ranked after the
    scored ones (in hybrid mode: last in the image leg) and marked ``not_reranked`` with
    ``unscored(id)``'s reason.
    """
    scores = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(scores)

    def mark(i: int) -> dict[str, Any]:
        if not nan[i]:
            return {"rerank_score": float(scores[i]), "not_reranked": None}
        why = unscored(hits[i].id) if unscored is not None else None
        return {"rerank_score": None, "not_reranked": why or "the reranker could not score it"}

    if mode != "hybrid":
        order = np.argsort(-np.where(nan, -np.inf, scores), kind="stable")[:k]
        return [dataclasses.replace(hits[int(i)], score=hits[int(i)].score if nan[i] else float(scores[i]), rank=r, **mark(int(i)))
                for r, i in enumerate(order, start=1)]
    text = [h.text_score for h in hits]
    finite = scores[~nan]
    leg = np.where(nan, finite.min() - 1.0 if finite.size else 0.0, scores)  # unscored: last in the image leg
    fused = fuse_legs(leg, text, ranker=search.hybrid_ranker, weights=tuple(search.hybrid_weights), rrf_k=search.rrf_k)
    order = np.argsort(-fused, kind="stable")[:k]
    return [dataclasses.replace(hits[int(i)], score=float(fused[i]), rank=r, **mark(int(i)))
            for r, i in enumerate(order, start=1)]


def fuse_legs(image: np.ndarray, text: Sequence[float | None], *, ranker: str = "rrf",
              weights: tuple[float, float] = (0.5, 0.5), rrf_k: int = 60) -> np.ndarray:
    """Fuse an image-leg score per candidate with an optional text-leg score (``None``: the item
    has no text vector, so it is absent from that leg, as in Milvus' hybrid search).

    ``rrf``: sum over legs of ``1 / (rrf_k + rank)`` (rank 1 = best in that leg).
    ``weighted``: ``w_image * a + w_text * b`` with each leg's scores min-max scaled to [0, 1]
    over the candidates (reranker logits and cosines live on different scales; a leg where every
    candidate scores the same contributes its full weight to each).
    """
    image = np.asarray(image, dtype=np.float64)
    present = np.array([t is not None for t in text], dtype=bool)
    if len(present) != len(image):
        raise InputError(f"fuse_legs: {len(image)} image scores but {len(present)} text scores")
    text_scores = np.array([t if t is not None else 0.0 for t in text], dtype=np.float64)
    if ranker == "rrf":
        fused = 1.0 / (rrf_k + _ranks(image))
        if present.any():
            ranks = np.full(len(image), np.inf)
            ranks[present] = _ranks(text_scores[present])
            fused = fused + 1.0 / (rrf_k + ranks)  # 1 / inf = 0 for items without text
        return fused
    if ranker == "weighted":
        w_image, w_text = weights
        fused = w_image * _unit(image)
        if present.any():
            part = np.zeros(len(image))
            part[present] = _unit(text_scores[present])
            fused = fused + w_text * part
        return fused
    raise InputError(f"unknown hybrid ranker {ranker!r}; use rrf or weighted")


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score, best (highest) first; ties ranked in input order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def _unit(scores: np.ndarray) -> np.ndarray:
    lo, hi = float(scores.min()), float(scores.max())
    return np.ones_like(scores) if hi <= lo else (scores - lo) / (hi - lo)
