"""One search, from a query to ranked hits: every decision written once.

``Pipeline.search``, the HTTP engine (``mmr serve``'s ``/search``) and ``mmr eval`` run the same
steps; only *how* the models run differs (the server batches its device work):

1. :func:`query_kind` and :func:`plan_search` check the request and decide what will run, before
   any model or store is touched: the kind of query, the mode asked for, k / offset / candidates
   within their limits, and whether the reranker runs. An explicit ``rerank=True`` that cannot be
   honoured (no reranker; an image query; text mode) is an :class:`~mm_retrieval.errors.InputError`
   naming why; ``rerank=None`` means "rerank when a reranker is configured and applies".
2. :func:`resolve_mode` picks the vectors searched (``auto``: a text query searches image and
   text vectors fused when the collection holds text vectors, else image vectors; an image query
   searches image vectors), asking the collection through :class:`CollectionFacts`.
3. Encoding: a text query is one :class:`~mm_retrieval.query.Query`, encoded once and shared by
   the first stage and the reranker (:func:`encode_text`); an image query is a vector
   (:func:`encode_image_query`, :func:`stored_vector`).
4. :func:`first_stage`: the store's search in that mode (hybrid: Milvus' own fusion); with
   ``group_by_video`` (the default) the store keeps each video's best segment (Milvus' grouping
   search on ``media_id``), so one long video cannot fill the page. Grouping happens here,
   before reranking: the reranker's candidates are then distinct videos and images, and it
   scores one moment per video (the first stage's best).
5. :func:`rerank` (or, with scores computed elsewhere, :func:`apply_rerank_scores`): the
   reranker's order in image mode, fused with the text leg in hybrid mode
   (:mod:`mm_retrieval.stages.fusion`).
6. :func:`finish`: the page of hits (``offset``) and the timings, as a
   :class:`~mm_retrieval.types.SearchResult`.

:func:`run_search` chains the steps for the library and the CLI.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SearchConfig, config_from_dict, prune_none
from .errors import InputError, StageError
from .query import Query
from .stages.base import Encoder, Reranker, Store
from .stages.fusion import apply_rerank_scores
from .types import Hit, SearchResult

__all__ = [
    "MAX_CANDIDATES", "MODES", "CollectionFacts", "SearchPlan", "Timings", "apply_rerank_scores",
    "encode_image_query", "encode_text", "finish", "first_stage", "plan_search", "query_kind", "query_label",
    "read_image_query", "rerank", "resolve_mode", "run_search", "stored_vector",
]

MAX_CANDIDATES = 16384  # Milvus' top-k limit
MIN_SCORE_K = 1000  # with --min-score and no --k: "every hit above X" is capped here
COLLAPSE_FETCH = 3  # --collapse-duplicates fetches this many first-stage hits per hit shown
HIT_SORT_FIELDS = ("score", "retrieval_score", "path", "caption")  # --sort keys that are a hit's own; others are metadata
_SORT_KEY = re.compile(r"^-?[A-Za-z_][A-Za-z0-9_.]*$")
MAX_IMAGE_QUERY_BYTES = 20 * 1024 * 1024
MODES = ("auto", "image", "text", "hybrid", "ocr")
TEXT, IMAGE = "text", "image"
OCR = "ocr"  # the words read in images (mm_retrieval.ocr): no model, no vectors


@dataclass(frozen=True)
class SearchPlan:
    """What one search will do, decided from the request alone (no model, no store).

    ``mode`` is the mode asked for (``auto`` included; :func:`resolve_mode` gives the one
    searched). ``rerank`` says whether the reranker runs. ``options`` carries the hybrid
    fusion settings (``hybrid_ranker``, ``hybrid_weights``, ``rrf_k``).
    """

    kind: str  # "text" | "image"
    mode: str
    k: int
    offset: int
    candidates: int
    filter: str
    rerank: bool
    options: SearchConfig
    group_by_video: bool = True  # one hit per video (its best segment)
    min_score: float | None = None  # range search: every first-stage hit scoring above this (at most top)
    sort: tuple[str, ...] = ()  # order of the hits: fields, "-" first for descending (see sort_hits)
    collapse_duplicates: bool = False  # near-duplicates of a better hit dropped (see collapse_duplicates)

    @property
    def top(self) -> int:
        """Hits ranked before the page ends (``offset + k``)."""
        return self.offset + self.k

    @property
    def depth(self) -> int:
        """First-stage hits to fetch: the reranker orders the top ``max(candidates, offset + k)``;
        with ``min_score``, every hit above it up to :data:`MIN_SCORE_K` (the set that ``sort``
        orders and ``offset``/``k`` page through, so pages of a sorted cutoff agree)."""
        if self.rerank:
            depth = max(self.candidates, self.top)
        else:
            depth = max(self.top, MIN_SCORE_K) if self.min_score is not None else self.top
        if self.collapse_duplicates:  # room for the copies that are dropped
            depth = min(MAX_CANDIDATES, max(depth, self.top * COLLAPSE_FETCH))
        return depth


def query_kind(query: Any, image: Any, image_id: Any) -> str:
    """``"text"`` or ``"image"``; InputError unless exactly one of the three is given."""
    if sum(x is not None for x in (query, image, image_id)) != 1:
        raise InputError("give exactly one of a text query, an image (--image PATH_OR_URL, or image bytes) or an indexed image's id")
    return TEXT if query is not None else IMAGE


def plan_search(defaults: SearchConfig, *, kind: str, has_reranker: bool, mode: str | None = None, k: int | None = None,
                candidates: int | None = None, offset: int = 0, filter: str = "", rerank: bool | None = None,
                group_by_video: bool | None = None, min_score: float | None = None, sort: str | None = None,
                collapse_duplicates: bool = False) -> SearchPlan:
    """Check a search's options against ``defaults`` (the pipeline's ``[search]``) and decide
    whether it reranks. ``None`` means "the default" (``group_by_video``: on). Raises
    :class:`InputError` naming what is wrong, including an explicit ``rerank=True`` that cannot
    be honoured. ``min_score``: every hit above it, up to ``k`` (default :data:`MIN_SCORE_K`);
    ``sort``: comma-separated fields to order the hits by (:func:`sort_hits`); ``collapse_duplicates``:
    one hit per group of near-duplicates (:func:`collapse_duplicates`)."""
    if min_score is not None:
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score):
            raise InputError(f"--min-score must be a finite number (a similarity, e.g. 0.25), got {min_score!r}")
        if k is None:
            k = MIN_SCORE_K
    keys = parse_sort(sort)
    opts = config_from_dict(SearchConfig, {**vars(defaults), **prune_none({"k": k, "candidates": candidates, "mode": mode})},
                            where="search options")
    if opts.mode not in MODES:
        raise InputError(f"unknown --mode {opts.mode!r}; use {', '.join(MODES)}")
    if opts.k < 1 or opts.candidates < 1 or offset < 0:
        raise InputError(f"--k and --candidates must be at least 1 and offset at least 0 (got k={opts.k}, "
                         f"candidates={opts.candidates}, offset={offset})")
    if opts.k + offset > MAX_CANDIDATES or opts.candidates > MAX_CANDIDATES:
        raise InputError(f"--k (k + offset) and --candidates can be at most {MAX_CANDIDATES} "
                         f"(got k={opts.k}, offset={offset}, candidates={opts.candidates})")
    why_not = _why_not_reranked(kind, opts.mode, has_reranker)
    if rerank and why_not:
        raise InputError(f"reranking was asked for, but {why_not}")
    reranks = why_not is None and (rerank if rerank is not None else bool(opts.rerank))
    return SearchPlan(kind=kind, mode=opts.mode, k=opts.k, offset=offset, candidates=opts.candidates, filter=filter,
                      rerank=reranks, options=opts, group_by_video=True if group_by_video is None else bool(group_by_video),
                      min_score=None if min_score is None else float(min_score), sort=keys,
                      collapse_duplicates=bool(collapse_duplicates))


def parse_sort(sort: str | None) -> tuple[str, ...]:
    """``"-taken,score"`` -> ``("-taken", "score")``; InputError for a malformed field name."""
    keys = tuple(part.strip() for part in (sort or "").split(",") if part.strip())
    bad = [key for key in keys if not _SORT_KEY.match(key)]
    if bad:
        raise InputError(f"--sort {sort!r}: {', '.join(map(repr, bad))} is not a field name; give a metadata field or "
                         f"{', '.join(HIT_SORT_FIELDS)}, with '-' first for descending, e.g. --sort -taken")
    return keys


def sort_hits(hits: Sequence[Hit], keys: Sequence[str]) -> list[Hit]:
    """``hits`` ordered by ``keys`` (a hit's own ``score``/``retrieval_score``/``path``/``caption``,
    else a metadata field; ``-`` first: descending). Stable, so equal values keep the relevance
    order; hits without the field come last either way, and values of different types (a number
    and a string) order numbers first. A hit's ``rank`` stays its relevance rank."""
    out = list(hits)
    for key in reversed(keys):
        desc, name = key.startswith("-"), key.lstrip("-")

        def value(h: Hit, name: str = name) -> Any:
            return getattr(h, name) if name in HIT_SORT_FIELDS else h.metadata.get(name) if isinstance(h.metadata, dict) else None

        present = [h for h in out if value(h) is not None]
        missing = [h for h in out if value(h) is None]
        numbers = [h for h in present if isinstance(value(h), (int, float)) and not isinstance(value(h), bool)]
        others = [h for h in present if not (isinstance(value(h), (int, float)) and not isinstance(value(h), bool))]
        numbers.sort(key=value, reverse=desc)
        others.sort(key=lambda h: str(value(h)), reverse=desc)
        out = numbers + others + missing
    return out


def _why_not_reranked(kind: str, mode: str, has_reranker: bool) -> str | None:
    # The reranker scores a text query against images. The asked-for mode is enough to decide:
    # ``auto`` never resolves to text mode for a text query, nor to anything but image for an image query.
    if not has_reranker:
        return "no reranker is configured: load one (--rerank DIR for mmr search and mmr serve, reranker= in Python), or don't ask for reranking"
    if kind == IMAGE:
        return "image queries are not reranked (the reranker scores a text query against images); leave reranking off"
    if mode == TEXT:
        return "--mode text is not reranked (its candidates are found by their text vectors; the reranker scores images); use --mode image or hybrid, or leave reranking off"
    if mode == OCR:
        return "--mode ocr is not reranked (it finds the words read in images, not what they show); use --mode image or hybrid, or leave reranking off"
    return None


class CollectionFacts:
    """What searches learn about a collection and remember, so a query costs one store call:
    that it exists and was built by this encoder (asked once), and whether it holds text vectors
    (remembered once seen; a search that needs them asks again while there were none, since
    another process may add some). Start afresh (a new instance) after writing to the collection."""

    def __init__(self, store: Store):
        self.store = store
        self.prechecked = False  # exists, fits the encoder (no model loaded)
        self.checked = False  # and the encoder is warm
        self._has_text: bool | None = None

    def precheck(self, encoder: Encoder, filter: str = "") -> None:
        """The collection exists, fits ``encoder`` and accepts ``filter``: asked once, before any
        model is imported or loaded, so that these errors come within a second (later searches
        report a bad filter themselves)."""
        if not self.prechecked:
            self.store.require()
            self.store.check_compatible(encoder.cheap_info())
            self.store.check_filter(filter)
            self.prechecked = True

    def check(self, encoder: Encoder, filter: str = "") -> None:
        """:meth:`precheck`, then ``encoder`` is warmed up here: model loading is not part of a
        query's timings."""
        self.precheck(encoder, filter)
        encoder.warm_up()
        self.checked = True

    def has_text(self, *, ask_again: bool = False) -> bool:
        """Whether the collection holds text vectors; ``ask_again``: ask again if it had none."""
        if self._has_text is None or (ask_again and not self._has_text):
            self._has_text = self.store.count_with_text() > 0
        return self._has_text


def resolve_mode(plan: SearchPlan, facts: CollectionFacts) -> str:
    """The mode searched. ``auto``: for a text query hybrid when the collection holds text
    vectors, else image; for an image query image (similar images: image -> text is ``text``,
    both fused ``hybrid``, only when asked for). ``text`` and ``hybrid`` need text vectors (an
    InputError saying how to get them, otherwise)."""
    if plan.mode == "auto":
        if plan.kind == IMAGE:
            return IMAGE  # "find similar": fusing in an image -> caption leg would bury the image itself
        return "hybrid" if facts.has_text() else IMAGE
    if plan.mode in (TEXT, "hybrid") and not facts.has_text(ask_again=True):
        raise InputError(
            f"--mode {plan.mode} needs text vectors, and collection {facts.store.name!r} has none: index a table with a "
            "caption column (or --text-columns), or search with --mode image"
        )
    return plan.mode


# ---- encoding ----------------------------------------------------------------------------------
def encode_text(text: str, encoder: Encoder, reranker: Reranker | None) -> Query:
    """The query, encoded once for the first stage and the reranker: when the reranker reads
    token features, they come from the same forward pass as the embedding."""
    query = Query(text, encoder)
    if reranker is not None and reranker.needs_text_features:
        query.text_features()
    query.embedding()
    return query


def read_image_query(image: str | Path | bytes) -> bytes:
    """The bytes of an image query: a file, an http(s) URL (bounded), or bytes as given."""
    if isinstance(image, bytes):
        data = image
    elif str(image).startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(str(image), timeout=15) as resp:  # noqa: S310 (http(s) only)
                data = resp.read(MAX_IMAGE_QUERY_BYTES + 1)
        except OSError as e:
            raise InputError(f"cannot fetch the image query {image}: {e}") from e
    else:
        p = Path(image).expanduser()
        if not p.is_file():
            raise InputError(f"image query not found: {p}")
        data = p.read_bytes()[: MAX_IMAGE_QUERY_BYTES + 1]
    if len(data) > MAX_IMAGE_QUERY_BYTES:
        raise InputError(f"the image query is larger than {MAX_IMAGE_QUERY_BYTES // (1024 * 1024)} MiB")
    return data


def encode_image_query(encoder: Encoder, image: str | Path | bytes) -> np.ndarray:
    """[D] embedding of an image query (decoded with the same safety limits as indexing)."""
    from .decode import DecodeError, decode_image

    try:
        pil = decode_image(read_image_query(image))
    except DecodeError as e:
        raise InputError(f"the image query is not a usable image: {e}") from e
    emb, _ = encoder.encode_pixels(encoder.image_transform(pil).unsqueeze(0))
    return np.asarray(emb[0], dtype=np.float32)


def stored_vector(store: Store, item_id: str) -> np.ndarray:
    """[D] image vector of an indexed item (the query of "find similar images")."""
    rows = store.get([item_id], fields=["id", "vector", "has_image"])
    if not rows or not rows[0].get("has_image", True):
        raise InputError(f"no indexed image with id {item_id!r}")
    return np.asarray(rows[0]["vector"], dtype=np.float32)


def query_label(text: str | None, image: Any = None, image_id: str | None = None) -> str:
    """What a result says was searched for: the text, ``image:<id>`` or ``image:<path or size>``."""
    if text is not None:
        return text
    if image_id is not None:
        return f"image:{image_id}"
    return f"image:<{len(image)} bytes>" if isinstance(image, bytes) else f"image:{image}"


# ---- searching ---------------------------------------------------------------------------------
def first_stage(store: Store, plan: SearchPlan, mode: str, vectors: np.ndarray, *, depth: int | None = None) -> list[list[Hit]]:
    """For each query vector ([N, D]), the best ``depth`` (default :attr:`SearchPlan.depth`) hits
    in ``mode``. Hybrid keeps text-only items out when reranking (the reranker scores images).
    With ``plan.group_by_video`` each video contributes its best segment only."""
    limit = plan.depth if depth is None else depth
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, np.shape(vectors)[-1])
    if mode != "hybrid":
        found = store.search(vectors, limit, plan.filter, mode=mode, **_options(store, plan))
        return [_above(hits, plan, store) for hits in found]
    o = plan.options
    return [_above(store.hybrid_search(v, limit, plan.filter, ranker=o.hybrid_ranker, weights=tuple(o.hybrid_weights), rrf_k=o.rrf_k,
                                       images_only=plan.rerank, **_options(store, plan)), plan, store) for v in vectors]


def _options(store: Store, plan: SearchPlan) -> dict[str, Any]:
    """The plan's grouping and ``min_score``, for a store that takes them (:attr:`Store.search_options`).
    A store written before videos has no media fields: each of its items is its own media item, so
    there is nothing to group. Without range search, :func:`_above` cuts its top hits instead."""
    out: dict[str, Any] = {}
    if "group_by_media" in store.search_options:
        out["group_by_media"] = plan.group_by_video
    if plan.min_score is not None and "min_score" in store.search_options:
        out["min_score"] = plan.min_score
    return out


def _above(hits: list[Hit], plan: SearchPlan, store: Store) -> list[Hit]:
    """A store without range search (a third-party one): its top hits cut at ``min_score`` here
    (a similarity: in hybrid mode the image or the text one, as Milvus' legs do)."""
    if plan.min_score is None or "min_score" in store.search_options:
        return hits

    def best(h: Hit) -> float:
        sims = [s for s in (h.image_score, h.text_score) if s is not None]
        return max(sims) if sims else h.retrieval_score

    return [h for h in hits if best(h) > plan.min_score]


def collapse_duplicates(store: Store, hits: Sequence[Hit]) -> list[Hit]:
    """``hits`` with each near-duplicate of a better-ranked hit dropped (the pair rule of
    :func:`mm_retrieval.neardup.same_photo`: image vectors and perceptual hashes both close), ranks
    renumbered; a kept hit that stands for dropped ones says how many (``near_duplicates``). Items without a stored hash are never dropped (``mmr duplicates --backfill``)."""
    from dataclasses import replace

    from .neardup import PHASH_KEY, collapse

    images = [h for h in hits if h.has_image and h.video_id is None]
    if len(images) < 2:
        return list(hits)
    rows = store.get([h.id for h in images], ["vector", "metadata"])
    vectors = {r["id"]: r["vector"] for r in rows}
    hashes = {r["id"]: (r.get("metadata") or {}).get(PHASH_KEY) for r in rows}
    hidden: dict[str, int] = {}
    kept = collapse(list(hits), lambda h: h.id, vectors, hashes, hidden=hidden)
    return [replace(h, rank=i + 1, near_duplicates=hidden.get(h.id)) for i, h in enumerate(kept)]


def rerank(plan: SearchPlan, mode: str, reranker: Reranker, query: Query, hits: Sequence[Hit]) -> list[Hit]:
    """The reranker's scores for ``hits`` (the query already encoded), ordered or fused by
    :func:`apply_rerank_scores`; the top :attr:`SearchPlan.top` are kept."""
    if not hits:
        return []
    scores = np.asarray(reranker.score(query, hits), dtype=np.float64).reshape(-1)
    if len(scores) != len(hits):
        raise StageError(reranker.label, f"returned {len(scores)} scores for {len(hits)} hits")
    return apply_rerank_scores(hits, scores, plan.top, mode=mode, search=plan.options, unscored=unscored_reason(reranker))


def unscored_reason(reranker: Reranker):
    """``id -> why the reranker left it unscored`` for a reranker that computes tokens lazily, else None."""
    from .tokencache.lazy import FillsTokens

    return reranker.unscored_reason if isinstance(reranker, FillsTokens) else None


def finish(plan: SearchPlan, mode: str, hits: Sequence[Hit], timings: "Timings", label: str) -> SearchResult:
    """The page ``offset + 1 .. offset + k`` of the ranked ``hits`` (ranks stay those of the
    whole list) as a SearchResult. With ``plan.sort`` the page is cut from the hits in that
    order: all that were fetched (with ``min_score``: every hit above it), else the top
    ``offset + k``."""
    pool = list(hits) if plan.min_score is not None else list(hits[: plan.top])
    if plan.sort:
        pool = sort_hits(pool, plan.sort)
    return SearchResult(query=label, hits=pool[plan.offset : plan.top], timings_ms=timings.done(), reranked=plan.rerank, mode=mode)


class Timings:
    """Milliseconds per step (``encode``, ``search``, ``rerank``) and their ``total``."""

    STEPS = ("encode", "search", "rerank")

    def __init__(self) -> None:
        self.ms = dict.fromkeys(self.STEPS, 0.0)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - t) * 1000

    def done(self) -> dict[str, float]:
        return {**self.ms, "total": sum(self.ms[s] for s in self.STEPS)}


def run_search(plan: SearchPlan, *, store: Store, encoder: Encoder, reranker: Reranker | None, facts: CollectionFacts,
               text: str | None = None, image: str | Path | bytes | None = None, image_id: str | None = None) -> SearchResult:
    """Run a planned search with the stages in this process (``reranker`` is used only when
    ``plan.rerank``). The query is exactly one of ``text`` (validated), ``image`` or ``image_id``."""
    if plan.mode == OCR:
        return search_words(plan, store=store, encoder=encoder, facts=facts, text=text, label=query_label(text, image, image_id))
    facts.check(encoder, plan.filter)
    mode = resolve_mode(plan, facts)
    if plan.rerank:
        if reranker is None:
            raise ValueError("the plan reranks, but no reranker was given (plan_search's has_reranker was wrong)")
        reranker.warm_up()  # model loading is not part of the query's timings
    timings = Timings()
    query = None
    with timings.step("encode"):
        if text is not None:
            query = encode_text(text, encoder, reranker if plan.rerank else None)
            vector = query.embedding()
        elif image_id is not None:
            vector = stored_vector(store, image_id)
        else:
            vector = encode_image_query(encoder, image)
    with timings.step("search"):
        hits = first_stage(store, plan, mode, vector[None])[0]
        if plan.collapse_duplicates:
            hits = collapse_duplicates(store, hits)
    with timings.step("rerank"):
        if plan.rerank:
            hits = rerank(plan, mode, reranker, query, hits)
    return finish(plan, mode, hits, timings, query_label(text, image, image_id))


def search_words(plan: SearchPlan, *, store: Store, encoder: Encoder, facts: CollectionFacts, text: str | None,
                  label: str) -> SearchResult:
    """``--mode ocr``: the items whose text read from their images holds the query's words
    (:func:`mm_retrieval.ocr.ocr_search`); no model is loaded."""
    from .ocr import ocr_search

    if text is None:
        raise InputError("--mode ocr searches the words read in images: give a text query (image queries use --mode image)")
    facts.precheck(encoder, plan.filter)
    timings = Timings()
    with timings.step("search"):
        hits = ocr_search(store, text, plan.depth, plan.filter)
        if plan.collapse_duplicates:
            hits = collapse_duplicates(store, hits)
    return finish(plan, OCR, hits, timings, label)
