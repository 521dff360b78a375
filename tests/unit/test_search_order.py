"""--sort and --min-score's pieces that need no store: the order of hits, the plan, and the cut
made for a store that has no range search of its own."""

import pytest

from mm_retrieval.config import SearchConfig
from mm_retrieval.errors import InputError
from mm_retrieval.search import MIN_SCORE_K, first_stage, parse_sort, plan_search, sort_hits
from mm_retrieval.types import Hit


def _hit(i, score, **meta):
    return Hit(id=str(i), path=f"/p/{i}.jpg", score=score, retrieval_score=score, metadata=meta, rank=i)


HITS = [_hit(1, 0.9, taken="2023-01-01", alt=5.0), _hit(2, 0.8, taken="2024-06-01T10:00:00+02:00"), _hit(3, 0.7),
        _hit(4, 0.6, taken="2024-01-01", alt="high"), _hit(5, 0.5, alt=-2.0)]


def test_sort_hits_by_metadata_missing_last_stable():
    assert [h.id for h in sort_hits(HITS, ["-taken"])] == ["2", "4", "1", "3", "5"]
    assert [h.id for h in sort_hits(HITS, ["taken"])] == ["1", "4", "2", "3", "5"]
    assert [h.id for h in sort_hits(HITS, ["alt"])] == ["5", "1", "4", "2", "3"]  # numbers, then other types, then missing
    assert [h.id for h in sort_hits(HITS, ["score"])] == ["5", "4", "3", "2", "1"]
    assert [h.rank for h in sort_hits(HITS, ["-taken"])] == [2, 4, 1, 3, 5]  # ranks stay the relevance ranks


def test_plan_parses_sort_and_min_score():
    plan = plan_search(SearchConfig(), kind="text", has_reranker=False, min_score=0.2, sort="-taken, path")
    assert plan.sort == ("-taken", "path") and plan.min_score == 0.2 and plan.k == MIN_SCORE_K
    assert plan_search(SearchConfig(), kind="text", has_reranker=False, min_score=0.2, k=5).k == 5
    assert parse_sort(None) == () and parse_sort("") == ()
    for bad in ("taken desc", "-", "a;b", "(x)"):
        with pytest.raises(InputError, match="--sort"):
            parse_sort(bad)
    for bad in (float("nan"), float("inf"), "0.2", True):
        with pytest.raises(InputError, match="--min-score"):
            plan_search(SearchConfig(), kind="text", has_reranker=False, min_score=bad)


class TopKOnlyStore:
    """A third-party store written before videos and range search: ``search`` takes neither
    ``group_by_media`` nor ``min_score``, and says so."""

    search_options = frozenset()

    def search(self, vectors, limit, filter="", *, mode="image"):
        return [list(HITS[:limit]) for _ in range(len(vectors))]


def test_a_store_without_range_search_is_cut_after_its_top_k():
    plan = plan_search(SearchConfig(), kind="text", has_reranker=False, min_score=0.65, mode="image")
    hits = first_stage(TopKOnlyStore(), plan, "image", [[1.0, 0.0]])[0]
    assert [h.id for h in hits] == ["1", "2", "3"]
