"""Fusing a reranked image leg with the hybrid search's text leg (mm_retrieval.stages.fusion)."""

from types import SimpleNamespace

import numpy as np
import pytest

from mm_retrieval.errors import InputError
from mm_retrieval.stages.fusion import apply_rerank_scores, fuse_legs
from mm_retrieval.types import Hit


def test_rrf_sums_reciprocal_ranks_and_skips_items_without_text():
    image = np.array([3.0, 1.0, 2.0])  # ranks 1, 3, 2
    text = [0.1, 0.9, None]  # ranks 2, 1, absent
    fused = fuse_legs(image, text, ranker="rrf", rrf_k=10)
    assert fused == pytest.approx([1 / 11 + 1 / 12, 1 / 13 + 1 / 11, 1 / 12])


def test_rrf_without_any_text_is_the_image_order():
    image = np.array([0.2, 0.9, 0.5])
    fused = fuse_legs(image, [None, None, None], ranker="rrf", rrf_k=60)
    assert list(np.argsort(-fused)) == [1, 2, 0]


def test_weighted_scales_each_leg_to_unit_range():
    image = np.array([10.0, 30.0, 20.0])  # reranker logits: -> 0, 1, 0.5
    text = [0.5, 0.1, None]  # cosines among items with text: -> 1, 0; absent -> 0
    fused = fuse_legs(image, text, ranker="weighted", weights=(0.25, 0.75))
    assert fused == pytest.approx([0.75, 0.25, 0.125])


def test_constant_leg_counts_fully_for_everyone():
    fused = fuse_legs(np.array([1.0, 1.0]), [0.3, 0.1], ranker="weighted", weights=(0.5, 0.5))
    assert fused == pytest.approx([1.0, 0.5])


def test_bad_input_is_named():
    with pytest.raises(InputError, match="unknown hybrid ranker 'max'"):
        fuse_legs(np.zeros(2), [None, None], ranker="max")
    with pytest.raises(InputError, match="2 image scores but 1 text"):
        fuse_legs(np.zeros(2), [None])


def _hits():
    return [Hit("a", "a.png", 0.03, 0.03, rank=1, image_score=0.1, text_score=0.9),
            Hit("b", "b.png", 0.02, 0.02, rank=2, image_score=0.8, text_score=0.2),
            Hit("c", "c.png", 0.01, 0.01, rank=3, image_score=0.5)]


SEARCH = SimpleNamespace(hybrid_ranker="rrf", hybrid_weights=[0.5, 0.5], rrf_k=60)


def test_hybrid_rerank_keeps_text_evidence():
    # the reranker's scores: image leg b, c, a; text leg a, b
    out = apply_rerank_scores(_hits(), [2.0, 5.0, 4.0], 3, mode="hybrid", search=SEARCH)
    assert [h.id for h in out] == ["b", "a", "c"]  # b: 1/61 + 1/62; a: 1/63 + 1/61; c: 1/62
    assert [h.rank for h in out] == [1, 2, 3]
    assert [h.rerank_score for h in out] == [5.0, 2.0, 4.0]
    assert out[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert out[0].retrieval_score == 0.02  # the first stage's score is kept
    assert out[0].to_dict()["rerank_score"] == 5.0 and out[2].to_dict().get("text_score") is None


def test_image_mode_is_the_reranker_order():
    out = apply_rerank_scores(_hits(), [2.0, 5.0, 4.0], 2, mode="image", search=SEARCH)
    assert [h.id for h in out] == ["b", "c"] and [h.score for h in out] == [5.0, 4.0]
    assert [h.rank for h in out] == [1, 2] and [h.rerank_score for h in out] == [5.0, 4.0] and out[0].retrieval_score == 0.02


def test_ties_keep_the_first_stage_order():
    out = apply_rerank_scores(_hits(), [1.0, 1.0, 1.0], 3, mode="image", search=SEARCH)
    assert [h.id for h in out] == ["a", "b", "c"]
