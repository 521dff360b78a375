"""The pure parts of lazy reranker tokens: budgets, and unscored candidates in the ranking."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mm_retrieval.errors import InputError
from mm_retrieval.stages.fusion import apply_rerank_scores
from mm_retrieval.tokencache.budget import budget_slots, parse_budget
from mm_retrieval.types import Hit


@pytest.mark.parametrize("spec, want", [("20GB", ("bytes", 20 * 10**9)), ("500MiB", ("bytes", 500 << 20)), ("1.5 TB", ("bytes", 1.5e12)),
                                        ("100000", ("items", 100000)), (250, ("items", 250)), ("", None), (None, None)])
def test_budgets_read_as_sizes_or_counts(spec, want):
    assert parse_budget(spec) == want


@pytest.mark.parametrize("spec", ["20 apples", "GB", "-3", "2.5", "0"])
def test_a_bad_budget_names_the_forms(spec):
    with pytest.raises(InputError, match="20GB|whole number"):
        parse_budget(spec)


def test_a_budget_in_bytes_holds_whole_slots():
    assert budget_slots(("bytes", 20 * 10**9), 886_272) == 22_566
    assert budget_slots(("items", 7), 886_272) == 7
    with pytest.raises(InputError, match="holds no image"):
        budget_slots(("bytes", 1000), 886_272)


def _hits():
    return [Hit(id=f"i{k}", path=f"/p{k}.png", score=s, retrieval_score=s, text_score=t)
            for k, (s, t) in enumerate([(0.9, 0.1), (0.8, None), (0.7, 0.3), (0.6, 0.2)])]


def test_an_unscored_candidate_keeps_its_first_stage_score_ranks_after_the_scored_and_is_marked():
    hits = _hits()
    ranked = apply_rerank_scores(hits, [1.0, np.nan, 3.0, 2.0], 4, mode="image", search=None, unscored=lambda i: f"gone {i}")
    assert [h.id for h in ranked] == ["i2", "i3", "i0", "i1"]
    last = ranked[-1]
    assert (last.score, last.rerank_score, last.not_reranked, last.rank) == (0.8, None, "gone i1", 4)
    assert all(h.not_reranked is None and h.rerank_score == h.score for h in ranked[:3])
    assert Hit.from_dict(last.to_dict()) == last and "not_reranked" not in ranked[0].to_dict()


def test_in_hybrid_mode_an_unscored_candidate_is_last_in_the_image_leg_only():
    search = SimpleNamespace(hybrid_ranker="rrf", hybrid_weights=[0.5, 0.5], rrf_k=60)
    ranked = apply_rerank_scores(_hits(), [1.0, 2.0, np.nan, 3.0], 4, mode="hybrid", search=search)
    by_id = {h.id: h for h in ranked}
    assert by_id["i2"].not_reranked == "the reranker could not score it" and by_id["i2"].rerank_score is None
    assert by_id["i2"].score == pytest.approx(1 / 64 + 1 / 61)  # last of 4 in the image leg, first in the text leg
    weighted = apply_rerank_scores(_hits(), [1.0, 2.0, np.nan, 3.0], 4, mode="hybrid",
                                   search=SimpleNamespace(hybrid_ranker="weighted", hybrid_weights=[0.5, 0.5], rrf_k=60))
    assert all(np.isfinite(h.score) for h in weighted)
