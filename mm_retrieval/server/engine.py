"""The server's engine: one pipeline, its reranker, and the batcher in front of the device.

Wire formats (:mod:`mm_retrieval.server.formats`) translate requests into two calls:

* :meth:`Engine.rerank` -- score documents for a query; returns scores in request order;
* :meth:`Engine.search` -- the ``mmr search`` flow (:mod:`mm_retrieval.search`), with the
  query's embedding and the reranker's scores computed by the batcher.

Blocking work (Milvus, SQLite, image decoding) runs in worker threads; model work runs on the
batcher's single device thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..errors import InputError, MMRError, StoreError
from ..pipeline import Pipeline
from ..query import Query, validate_query
from ..search import (SearchPlan, Timings, apply_rerank_scores, collapse_duplicates, encode_image_query, finish, first_stage, plan_search, query_kind,
                      query_label, resolve_mode, stored_vector, unscored_reason)
from ..tokencache.lazy import FillsTokens
from ..types import Hit, SearchResult
from .batcher import DynamicBatcher, QueueFull
from .config import ServerConfig
from .documents import Candidate, Document, DocumentResolver, check_count, check_text
from .errors import ApiError, from_mmr_error
from .media import MediaFiles
from .scoring import DeviceScorer, ScoreJob, ScoreResult

log = logging.getLogger(__name__)


@dataclass
class Ranking:
    """Scores of one rerank request, in request order, and the order to present them in."""

    scores: np.ndarray  # [N] the relevance score (see mm_retrieval.server.scoring)
    retrieval: np.ndarray  # [N] first-stage scores
    order: list[int]  # indices by descending score; ties keep request order
    query_tokens: int


class Engine:
    """Owns the pipeline's stages for the server's lifetime; create one per process."""

    def __init__(self, pipeline: Pipeline, config: ServerConfig | None = None):
        self.pipeline = pipeline
        self.config = config or ServerConfig()
        self.ready = False
        self.error: str | None = None  # why warm-up failed (shown by /readyz)
        self.batcher: DynamicBatcher[ScoreJob, ScoreResult] | None = None
        self.reranker: Any = None
        self.scorer: DeviceScorer | None = None
        self.model_name: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the models and check the collection; blocking, so call it from a thread. Idempotent."""
        if self.scorer is not None:
            return
        pipe = self.pipeline
        store = pipe.store
        encoder = pipe.encoder
        pipe.collection_facts.check(encoder)  # the collection exists and fits the encoder (warmed up)
        self.reranker = pipe.reranker
        if self.reranker is not None:
            self.reranker.warm_up()
        self.metric = store.metric
        self.resolver = DocumentResolver(store, encoder, self.config)
        self.media = MediaFiles(store, self.config)
        self.scorer = DeviceScorer(encoder, self.reranker, self.metric)
        self.model_name = self.config.model_name or _model_name(pipe)

    async def start(self) -> None:
        """Warm up (in a thread) and start the batcher on the running event loop."""
        try:
            await run_in_threadpool(self.warm_up)
        except MMRError as e:
            self.error = str(e)
            raise
        c = self.config
        self.batcher = DynamicBatcher(
            self.scorer, size_of=lambda job: job.size, max_jobs=c.max_batch_requests, max_items=c.max_batch_documents,
            max_wait_s=c.batch_wait_ms / 1000.0, max_queue=c.max_queue,
        )
        await self.batcher.start()
        self.ready = True
        log.info("ready: collection %r, reranker %s, batching %s", self.pipeline.store.name, self.model_name,
                 "on" if c.batching else "off")

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()

    @property
    def has_reranker(self) -> bool:
        return self.reranker is not None

    # ---- rerank ----------------------------------------------------------------------------
    async def rerank(self, query: str, documents: Sequence[Document]) -> Ranking:
        """Score ``documents`` for ``query``. Raises :class:`ApiError` for anything the caller
        must fix (empty, too many, unknown documents, bad images)."""
        q = self._query(query)
        check_count(len(documents), self.config)
        candidates = await self._threaded(self.resolver.resolve, documents)
        await self._fill_tokens([Hit(id=c.id, path="", score=0.0, retrieval_score=0.0) for c in candidates if c.id], find=True)
        result = await self._score(ScoreJob(query=q, candidates=candidates))
        scores = result.scores.copy()
        unscored = np.isnan(scores)  # no tokens could be computed (lazy tokens, file gone): the retrieval score, ranked last
        scores[unscored] = result.retrieval[unscored]
        order = np.lexsort((-scores, unscored)).tolist()
        return Ranking(scores=scores, retrieval=result.retrieval, order=order, query_tokens=result.query_tokens)

    # ---- search ----------------------------------------------------------------------------
    async def search(self, query: str | None = None, *, image: bytes | None = None, image_id: str | None = None,
                     k: int | None = None, candidates: int | None = None, filter: str = "", rerank: bool | None = None,
                     mode: str | None = None, offset: int = 0, group_by_video: bool | None = None,
                     min_score: float | None = None, sort: str | None = None,
                     collapse_duplicates: bool = False) -> SearchResult:
        """``mmr search`` over HTTP, by text (``query``) or by image (``image`` bytes, or
        ``image_id`` of an indexed item): the flow of :mod:`mm_retrieval.search`, so the same
        defaults, modes, limits, reranking rule and scores as ``Pipeline.search``. The model work
        runs on the device: the query's embedding and the reranker's scores as batcher jobs (shared
        with concurrent requests), an image query's encoding on the device thread.

        ``offset`` pages: the hits ranked ``offset + 1 .. offset + k`` of the same search with
        ``k = offset + k`` (reranking orders the top ``max(candidates, offset + k)`` candidates).
        What the request alone shows to be unusable (options, an explicit ``rerank`` that can't be
        honoured) is a 422; what the collection refuses (a mode without text vectors) a 400.
        ``group_by_video`` (None: on) keeps each video's best moment only. ``min_score`` and
        ``sort``: a relevance cutoff (range search) and an order, and ``collapse_duplicates`` one hit
        per group of near-duplicates, as in ``Pipeline.search``.
        """
        text = self._query(query) if query is not None else None
        try:
            plan = plan_search(self.pipeline.config.search, kind=query_kind(query, image, image_id), has_reranker=self.has_reranker,
                               mode=mode, k=k, candidates=candidates, offset=offset, filter=filter, rerank=rerank,
                               group_by_video=group_by_video, min_score=min_score, sort=sort,
                               collapse_duplicates=collapse_duplicates)
        except InputError as e:
            raise ApiError(422, str(e)) from e
        if plan.mode == "ocr":  # the words read in images: no model work
            from ..search import search_words

            pipe = self.pipeline
            return await self._threaded(lambda: search_words(plan, store=pipe.store, encoder=pipe.encoder, facts=pipe.collection_facts,
                                                             text=text, label=query_label(text, image, image_id)))
        searched = await self._threaded(resolve_mode, plan, self.pipeline.collection_facts)
        if image is not None:
            await self._threaded(self.resolver.check_image, image, "the image query")
        timings = Timings()
        q = Query(text, self.pipeline.encoder) if text is not None else None  # encoded once, by the batcher
        with timings.step("encode"):
            vector = await self._encode_query(q, image, image_id)
        with timings.step("search"):
            hits = await self._threaded(self._first_stage, plan, searched, vector)
        with timings.step("rerank"):
            if plan.rerank:
                hits = await self._rerank(plan, searched, q, hits)
        return finish(plan, searched, hits, timings, query_label(text, image, image_id))

    async def _encode_query(self, query: Query | None, image: bytes | None, image_id: str | None) -> np.ndarray:
        """[D] the query's vector: a text query's embedding from the batcher (with its token
        features, which the rerank job reuses), an indexed item's stored vector, or an image's
        embedding encoded on the device thread."""
        if query is not None:
            return (await self._score(ScoreJob(query=query, want_embedding=True))).embedding
        if image_id is not None:
            return await self._threaded(stored_vector, self.pipeline.store, image_id)
        encoder = self.pipeline.encoder
        return await self._on_device(lambda: encode_image_query(encoder, image))

    async def _rerank(self, plan: SearchPlan, mode: str, query: Query, hits: list[Hit]) -> list[Hit]:
        """The reranker's scores for ``hits`` from the batcher, ordered (or fused) as the library does."""
        if not hits:
            return []
        await self._fill_tokens(hits)
        cands = [Candidate(id=h.id) for h in hits]
        job = ScoreJob(query=query, candidates=cands, retrieval=np.array([h.first_stage_image_score for h in hits], np.float32))
        scores = (await self._score(job)).scores
        return apply_rerank_scores(hits, scores, plan.top, mode=mode, search=plan.options, unscored=unscored_reason(self.reranker))

    def _indexed_hits(self, ids: list[str]) -> list[Hit]:
        """Indexed items as the first stage returns them (path; a video moment's video and frame):
        what a lazy token fill reads."""
        store = self.pipeline.store
        media = store.has_media_fields()
        hits = []
        for r in store.get(ids, fields=("id", "path", *(("media_id", "frame") if media else ()))):
            h = Hit(id=str(r["id"]), path=r.get("path") or "", score=0.0, retrieval_score=0.0)
            if r.get("media_id") and r["media_id"] != h.id:
                h.video_id, h.frame = r["media_id"], r.get("frame")
            hits.append(h)
        return hits

    async def _fill_tokens(self, hits: list[Hit], *, find: bool = False) -> None:
        """A reranker whose tokens are computed lazily (``mmr index --tokens lazy``): compute the
        candidates' missing ones on a worker thread, not on the device thread, so that the
        batcher goes on scoring other requests (whose tokens are cached) while this query's
        images are encoded. The scoring job then finds them cached. ``find``: ``hits`` are bare
        ids; the store says where the missing ones' files are."""
        if not isinstance(self.reranker, FillsTokens) or not hits:
            return
        todo = await self._threaded(self.reranker.tokens_to_fill, hits)  # the token map only: no file, no store
        if todo and find:
            todo = await self._threaded(self._indexed_hits, [h.id for h in todo])
        if todo:
            await self._threaded(lambda: self.reranker.fill_tokens(todo, keep=[h.id for h in hits]))

    # ---- explain ---------------------------------------------------------------------------
    async def explain(self, query: str, item_id: str | None = None, *, path: str | None = None, image: bytes | None = None,
                      layer: int | None = None, head: int | None = None) -> dict[str, Any]:
        """The reranker's attention of ``query`` over an indexed item (``item_id``, or the item
        indexed from ``path``) or an inline ``image`` (see :func:`mm_retrieval.explain.attention_maps`):
        per query word, per head and averaged, and ``view``: the maps of ``layer`` and ``head``."""
        from ..explain import attention_maps, indexed_at

        q = self._query(query)
        if not (self.has_reranker and self.reranker.can_explain):
            raise ApiError(422, "this server has no reranker that can explain its scores: start it with `mmr serve --rerank DIR`")
        if path is not None:
            item_id = await self._threaded(indexed_at, self.pipeline.store, path)
            if item_id is None:
                raise ApiError(404, f"no item in collection {self.pipeline.store.name!r} was indexed from {path[:300]!r}; "
                                    "send the image itself (image) to explain it", param="path")
        if image is not None:
            await self._threaded(self.resolver.check_image, image, "the image")
        else:
            found = await self._threaded(self.media.locate, item_id)  # an indexed image, at its recorded path (see media.py)
            path = found.path

        def run() -> dict[str, Any]:
            ex = attention_maps(self.pipeline, q, image if image is not None else item_id)
            return {**ex.to_dict(), "heads": int(ex.head_maps.shape[0]), "path": path,
                    "view": ex.grid(layer=layer, head=head).tolist()}

        return await self._on_device(run)

    def _first_stage(self, plan: SearchPlan, mode: str, vector: np.ndarray) -> list[Hit]:
        try:
            hits = first_stage(self.pipeline.store, plan, mode, vector[None])[0]
            return collapse_duplicates(self.pipeline.store, hits) if plan.collapse_duplicates else hits
        except StoreError as e:
            if plan.filter and not e.retriable:  # a filter the store can't run is the caller's to fix
                raise ApiError(400, f"invalid filter expression {plan.filter[:200]!r}: {e}", param="filter") from e
            raise

    # ---- helpers ---------------------------------------------------------------------------
    def _query(self, query: str) -> str:
        check_text(query, "the query", self.config.max_query_chars)
        try:
            return validate_query(query)
        except InputError as e:
            raise ApiError(422, str(e), param="query") from e

    async def _threaded(self, fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except MMRError as e:
            raise from_mmr_error(e) from e

    async def _on_device(self, fn):
        """Run ``fn`` on the device thread (after the batches queued before it)."""
        if self.batcher is None or not self.ready:
            raise ApiError(503, "the server is still loading its models; retry shortly (GET /readyz says when it is ready)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self.batcher.executor, fn)
        except MMRError as e:
            raise from_mmr_error(e) from e

    async def _score(self, job: ScoreJob) -> ScoreResult:
        if self.batcher is None or not self.ready:
            raise ApiError(503, "the server is still loading its models; retry shortly (GET /readyz says when it is ready)")
        try:
            return await self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry shortly", kind="overloaded") from e
        except MMRError as e:
            raise from_mmr_error(e) from e

    def info(self) -> dict[str, Any]:
        """What /readyz reports."""
        store = self.pipeline.store
        doc: dict[str, Any] = {"ready": self.ready, "collection": store.name, "model": self.model_name,
                               "reranker": self.has_reranker}
        if self.error:
            doc["error"] = self.error
        if self.batcher is not None:
            doc["batching"] = self.batcher.stats.to_dict()
        return doc


def _model_name(pipe: Pipeline) -> str:
    """``mmr/<checkpoint folder>`` for a reranker, ``mmr/first-stage`` without one."""
    spec = pipe.config.reranker
    if spec is not None and spec.params.get("checkpoint"):
        return f"mmr/{Path(str(spec.params['checkpoint'])).resolve().name}"
    return "mmr/first-stage"
