"""What a search decides before any model runs (mm_retrieval/search.py): the plan (reranked or
not, and why not; limits; how deep the first stage goes), the mode searched (asking the collection
once), and the chain of steps, on the in-memory fakes of mm_retrieval.testing."""

from __future__ import annotations

import numpy as np
import pytest

from mm_retrieval.config import SearchConfig
from mm_retrieval.errors import IncompatibleError, InputError
from mm_retrieval.search import (
    COLLAPSE_FETCH,
    MAX_CANDIDATES,
    MIN_SCORE_K,
    CollectionFacts,
    plan_search,
    query_kind,
    resolve_mode,
    run_search,
)
from mm_retrieval.stages.base import Reranker
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore

DEFAULTS = SearchConfig()


def plan(**kw):
    kw.setdefault("kind", "text")
    kw.setdefault("has_reranker", True)
    return plan_search(kw.pop("defaults", DEFAULTS), **kw)


# ---- the plan --------------------------------------------------------------------------------
def test_exactly_one_query_is_given():
    assert query_kind("red", None, None) == "text"
    assert query_kind(None, b"png", None) == query_kind(None, None, "id1") == "image"
    for args in ((None, None, None), ("red", b"png", None), ("red", None, "id1")):
        with pytest.raises(InputError, match="exactly one"):
            query_kind(*args)


@pytest.mark.parametrize(("kind", "mode", "has_reranker", "asked", "reranks"), [
    ("text", "auto", True, None, True),  # a reranker is configured and applies: it runs
    ("text", "image", True, None, True),
    ("text", "hybrid", True, None, True),
    ("text", "auto", True, False, False),  # asked not to
    ("text", "auto", False, None, False),  # none configured: quietly not
    ("image", "auto", True, None, False),  # image queries are never reranked
    ("text", "text", True, None, False),  # nor text-vector and OCR searches
    ("text", "ocr", True, None, False),
])
def test_rerank_by_default_when_a_reranker_is_configured_and_applies(kind, mode, has_reranker, asked, reranks):
    assert plan(kind=kind, mode=mode, has_reranker=has_reranker, rerank=asked).rerank is reranks


@pytest.mark.parametrize(("kind", "mode", "has_reranker", "why"), [
    ("text", "auto", False, "no reranker is configured"),
    ("image", "auto", True, "image queries are not reranked"),
    ("image", "image", True, "image queries are not reranked"),
    ("text", "text", True, "--mode text is not reranked"),
    ("text", "ocr", True, "--mode ocr is not reranked"),
])
def test_reranking_asked_for_that_cannot_run_is_an_error_saying_why(kind, mode, has_reranker, why):
    with pytest.raises(InputError, match=f"reranking was asked for, but {why}"):
        plan(kind=kind, mode=mode, has_reranker=has_reranker, rerank=True)


def test_the_pipelines_defaults_fill_what_the_request_leaves_out():
    defaults = SearchConfig(k=3, candidates=7, rerank=False, mode="image")
    p = plan(defaults=defaults)
    assert (p.k, p.candidates, p.mode, p.rerank, p.offset) == (3, 7, "image", False, 0)
    assert plan(defaults=defaults, rerank=True).rerank  # the request overrides the default
    p = plan(defaults=defaults, k=5, candidates=9, mode="hybrid", offset=2)
    assert (p.k, p.candidates, p.mode, p.top) == (5, 9, "hybrid", 7)
    assert p.group_by_video and not plan(group_by_video=False).group_by_video  # None: grouped


@pytest.mark.parametrize(("kw", "message"), [
    ({"mode": "images"}, "unknown --mode 'images'; use auto, image, text, hybrid, ocr"),
    ({"k": 0}, "at least 1"),
    ({"candidates": 0}, "at least 1"),
    ({"offset": -1}, "offset at least 0"),
    ({"k": MAX_CANDIDATES, "offset": 1}, f"at most {MAX_CANDIDATES}"),
    ({"candidates": MAX_CANDIDATES + 1}, f"at most {MAX_CANDIDATES}"),
])
def test_options_out_of_range_are_errors_naming_them(kw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        plan(**kw)


def test_the_first_stage_fetches_what_the_reranker_and_the_page_need():
    assert plan(k=10, candidates=100).depth == 100  # the reranker orders the top candidates
    assert plan(k=10, candidates=100, offset=200).depth == 210  # ... or the whole page, if deeper
    assert plan(k=10, candidates=100, rerank=False).depth == 10  # no reranker: just the page
    assert plan(k=10, offset=5, rerank=False).depth == 15
    # every hit above min_score, so that a sorted cutoff pages consistently
    assert plan(k=10, rerank=False, min_score=0.2).depth == MIN_SCORE_K
    assert plan(rerank=False, min_score=0.2).k == MIN_SCORE_K
    # room for the near-duplicates that collapsing drops, within Milvus' limit
    assert plan(k=10, rerank=False, collapse_duplicates=True).depth == 10 * COLLAPSE_FETCH
    assert plan(k=10, candidates=100, collapse_duplicates=True).depth == 100
    assert plan(k=MAX_CANDIDATES, rerank=False, collapse_duplicates=True).depth == MAX_CANDIDATES


# ---- the mode searched -----------------------------------------------------------------------
class CountingStore(InMemoryStore):
    """The in-memory store, counting how often the search flow asks about the collection."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.asked: dict[str, int] = {}

    def _count(self, name):
        self.asked[name] = self.asked.get(name, 0) + 1

    def count_with_text(self):
        self._count("count_with_text")
        return super().count_with_text()

    def require(self):
        self._count("require")
        return super().require()


def _unit(i: int, dim: int) -> list[float]:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    return v.tolist()


def _store(encoder, *, images: int = 3, texts: int = 0) -> CountingStore:
    """A collection of ``images`` image rows, the first ``texts`` of them captioned (a text vector)."""
    store = CountingStore()
    store.ensure_collection(encoder.info())
    d = encoder.dim
    store.upsert([{"id": f"i{i}", "path": f"/photos/{i}.png", "vector": _unit(i, d),
                   **({"text_vector": _unit(i + 1, d), "caption": f"caption {i}"} if i < texts else {})}
                  for i in range(images)])
    store.asked.clear()  # only what searches ask counts
    return store


@pytest.fixture
def encoder():
    return HashEncoder()


def test_auto_searches_image_and_text_fused_only_when_the_collection_has_text_vectors(encoder):
    bare, captioned = _store(encoder), _store(encoder, texts=2)
    assert resolve_mode(plan(), CollectionFacts(bare)) == "image"
    assert resolve_mode(plan(), CollectionFacts(captioned)) == "hybrid"
    # an image query finds similar images: never fused with a caption leg unless asked
    assert resolve_mode(plan(kind="image", rerank=False), CollectionFacts(captioned)) == "image"
    assert resolve_mode(plan(kind="image", mode="hybrid", rerank=False), CollectionFacts(captioned)) == "hybrid"


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_text_vector_modes_on_a_collection_without_them_say_how_to_get_them(encoder, mode):
    with pytest.raises(InputError, match=f"--mode {mode} needs text vectors, and collection 'images' has none: "
                                         "index a table with a caption column"):
        resolve_mode(plan(mode=mode, rerank=False), CollectionFacts(_store(encoder)))


def test_the_collection_is_asked_once_and_again_only_while_it_had_no_text(encoder):
    store = _store(encoder)
    facts = CollectionFacts(store)
    for _ in range(3):
        assert resolve_mode(plan(), facts) == "image"
    assert store.asked["count_with_text"] == 1  # remembered
    # another process adds captions: auto keeps what it saw, a search that needs them asks again
    store.upsert([{"id": "t", "path": "/photos/t.png", "vector": _unit(0, encoder.dim),
                   "text_vector": _unit(1, encoder.dim), "caption": "a caption"}])
    assert resolve_mode(plan(), facts) == "image"
    assert resolve_mode(plan(mode="hybrid"), facts) == "hybrid"
    assert resolve_mode(plan(), facts) == "hybrid"  # and remembers they are there now
    assert store.asked["count_with_text"] == 2


def test_the_precheck_asks_once_and_names_what_is_wrong(encoder):
    store = CountingStore()
    with pytest.raises(InputError, match="collection 'images' does not exist"):
        CollectionFacts(store).precheck(encoder)
    store = _store(encoder)
    facts = CollectionFacts(store)
    facts.precheck(encoder, "path like '/photos/%'")
    facts.precheck(encoder)
    assert store.asked["require"] == 1 and facts.prechecked and not facts.checked
    with pytest.raises(IncompatibleError, match="built with encoder hash-d32"):
        CollectionFacts(store).precheck(HashEncoder(dim=16))
    with pytest.raises(InputError):
        CollectionFacts(store).precheck(encoder, "no_such_field == 1")


# ---- the chain -------------------------------------------------------------------------------
class ReversingReranker(Reranker):
    """Scores each hit by minus its first-stage score: the first-stage order, reversed."""

    def score(self, query, hits):
        self.seen = [h.id for h in hits]
        return np.array([-h.retrieval_score for h in hits])

    def token_writer(self):
        return None


def test_run_search_pages_the_reranked_order(encoder):
    store = _store(encoder, images=8)
    query_vector = encoder.encode_text(["red"])[0]
    store.upsert([{"id": "best", "path": "/photos/best.png", "vector": query_vector.tolist()}])  # the nearest
    reranker = ReversingReranker()

    p = plan(k=2, candidates=5, offset=1, mode="image")
    result = run_search(p, store=store, encoder=encoder, reranker=reranker, facts=CollectionFacts(store), text="red")
    assert result.reranked and result.mode == "image" and result.query == "red"
    assert len(reranker.seen) == 5 and reranker.seen[0] == "best"  # the first stage's top candidates
    assert [h.id for h in result.hits] == reranker.seen[::-1][1:3]  # reversed, then the page after the first
    assert [h.rank for h in result.hits] == [2, 3]
    assert set(result.timings_ms) == {"encode", "search", "rerank", "total"}

    unranked = run_search(plan(k=2, rerank=False, mode="image"), store=store, encoder=encoder, reranker=None,
                          facts=CollectionFacts(store), text="red")
    assert not unranked.reranked and unranked.hits[0].id == "best"


def test_run_search_finds_an_indexed_image_by_its_id(encoder):
    store = _store(encoder, images=4)
    p = plan(kind="image", rerank=False, k=1)
    result = run_search(p, store=store, encoder=encoder, reranker=None, facts=CollectionFacts(store), image_id="i2")
    assert [h.id for h in result.hits] == ["i2"] and result.query == "image:i2"
    with pytest.raises(InputError, match="no indexed image with id 'nope'"):
        run_search(p, store=store, encoder=encoder, reranker=None, facts=CollectionFacts(store), image_id="nope")
