"""The server's engine: one pipeline, its reranker, and the batcher in front of the device.

Wire formats (:mod:`mm_retrieval.server.formats`) translate requests into two calls:

* :meth:`Engine.rerank` -- score documents for a query; returns scores in request order;
* :meth:`Engine.search` -- the ``mmr search`` flow (first stage, then the reranker).

Blocking work (Milvus, SQLite, image decoding) runs in worker threads; model work runs on the
batcher's single device thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..config import SearchConfig, config_from_dict, prune_none
from ..errors import InputError, MMRError, StoreError
from ..pipeline import MAX_CANDIDATES, Pipeline, validate_query
from ..types import SearchResult
from .batcher import DynamicBatcher, QueueFull
from .config import ServerConfig
from .documents import Candidate, Document, DocumentResolver, check_count, check_text
from .errors import ApiError, from_mmr_error
from .media import MediaFiles
from .scoring import DeviceScorer, ScoreJob, ScoreResult, cross_attention_capable

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
        self._memory_cache = None

    # ---- lifecycle -------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the models and check the collection; blocking, so call it from a thread. Idempotent."""
        if self.scorer is not None:
            return
        pipe = self.pipeline
        store = pipe.store
        store.require()
        encoder = pipe.encoder
        encoder.warm_up()
        store.check_compatible(encoder.info())
        self.reranker = pipe.reranker
        if self.reranker is not None:
            self.reranker.warm_up()
            if cross_attention_capable(self.reranker):
                self._memory_cache = self.reranker.memory_cache()
        self.metric = str(getattr(store.config, "metric", "IP"))
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
        result = await self._score(ScoreJob(query=q, candidates=candidates, memory=await self._threaded(self._cached_memory, candidates)))
        order = np.argsort(-result.scores, kind="stable").tolist()
        return Ranking(scores=result.scores, retrieval=result.retrieval, order=order, query_tokens=result.query_tokens)

    # ---- search ----------------------------------------------------------------------------
    async def search(self, query: str | None = None, *, image: bytes | None = None, image_id: str | None = None,
                     k: int | None = None, candidates: int | None = None, filter: str = "", rerank: bool | None = None,
                     mode: str | None = None, offset: int = 0) -> SearchResult:
        """``mmr search`` over HTTP: same defaults, modes, candidates and scores, by text
        (``query``) or by image (``image`` bytes, or ``image_id`` of an indexed item).

        Text against image vectors with the reranker -- the common case -- goes through the
        batcher (first-stage scores from Milvus, reranker logits equal to ``Pipeline.search``'s up
        to float rounding). Every other case (first stage only, text or hybrid modes, image
        queries) runs ``Pipeline.search`` itself on the device thread, one request at a time.

        ``offset`` pages: the hits ranked ``offset + 1 .. offset + k`` of the same search with
        ``k = offset + k`` (reranking orders the top ``max(candidates, offset + k)`` candidates).
        """
        if sum(x is not None for x in (query, image, image_id)) != 1:
            raise ApiError(422, "give exactly one of query (text), image (base64 image bytes) or image_id (an indexed item's id)")
        q = self._query(query) if query is not None else None
        opts = config_from_dict(SearchConfig, {**vars(self.pipeline.config.search), **prune_none({"k": k, "candidates": candidates, "mode": mode})},
                                where="search options")
        if opts.k < 1 or opts.candidates < 1 or offset < 0 or max(opts.k + offset, opts.candidates) > MAX_CANDIDATES:
            raise ApiError(422, f"k and candidates must be at least 1, offset at least 0, and k + offset and candidates at most "
                                f"{MAX_CANDIDATES} (got k={opts.k}, offset={offset}, candidates={opts.candidates})")
        if rerank and not self.has_reranker:
            raise ApiError(422, "this server has no reranker: start it with `mmr serve --rerank DIR`, or send rerank: false")
        use_reranker = self.has_reranker and (rerank if rerank is not None else opts.rerank)
        resolved = await self._threaded(self.pipeline._resolve_mode, opts.mode)  # the pipeline's own auto/text/hybrid rules
        top = opts.k + offset
        if image is not None:
            await self._threaded(self.resolver.check_image, image, "the image query")
        if q is None or not (use_reranker and resolved == "image"):
            # image queries are never reranked (the reranker reads text), as in Pipeline.search
            result = await self._on_device(lambda: self.pipeline.search(
                q, image=image, image_id=image_id, mode=resolved, k=top, candidates=opts.candidates, filter=filter,
                rerank=bool(use_reranker)))
            return _page(result, offset)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        emb = (await self._score(ScoreJob(query=q, want_embedding=True))).embedding
        timings["encode"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        hits = await self._threaded(self._first_stage, emb, max(opts.candidates, top), filter)
        timings["search"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        if hits:
            cands = [Candidate(id=h.id) for h in hits]
            job = ScoreJob(query=q, candidates=cands, retrieval=np.array([h.first_stage_image_score for h in hits], np.float32),
                           memory=await self._threaded(self._cached_memory, cands))
            scores = (await self._score(job)).scores
            order = np.argsort(-scores, kind="stable")[:top]  # ties keep first-stage order, as Reranker.rerank
            hits = [dataclasses.replace(hits[int(i)], score=float(scores[i]), rank=r) for r, i in enumerate(order, start=1)]
        timings["rerank"] = (time.perf_counter() - t) * 1000
        timings["total"] = timings["encode"] + timings["search"] + timings["rerank"]
        return _page(SearchResult(query=q, hits=hits, timings_ms=timings, reranked=True, mode=resolved), offset)

    # ---- explain ---------------------------------------------------------------------------
    async def explain(self, query: str, item_id: str) -> dict[str, Any]:
        """The reranker's attention of ``query`` over indexed item ``item_id`` (see
        :func:`mm_retrieval.explain.attention_maps`): per query word, per head and averaged."""
        from ..explain import attention_maps

        q = self._query(query)
        if not (self.has_reranker and hasattr(self.reranker, "score_with_attention")):
            raise ApiError(422, "this server has no cross-attention reranker to explain: start it with `mmr serve --rerank DIR`")
        await self._threaded(self.media.locate, item_id)  # an indexed image, at its recorded path (see media.py)
        ex = await self._on_device(lambda: attention_maps(self.pipeline, q, item_id))
        return {**ex.to_dict(), "heads": int(ex.head_maps.shape[0])}

    def _first_stage(self, emb: np.ndarray, limit: int, filter: str):
        try:
            return self.pipeline.store.search(emb[None], limit, filter, mode="image")[0]
        except StoreError as e:
            if filter and not e.retriable:  # a filter the store can't run is the caller's to fix
                raise ApiError(400, f"invalid filter expression {filter[:200]!r}: {e}", param="filter") from e
            raise

    # ---- helpers ---------------------------------------------------------------------------
    def _query(self, query: str) -> str:
        check_text(query, "the query", self.config.max_query_chars)
        try:
            return validate_query(query)
        except InputError as e:
            raise ApiError(422, str(e), param="query") from e

    def _cached_memory(self, candidates: Sequence[Candidate]) -> list[np.ndarray | None]:
        """Reranker memory already cached for indexed candidates (read here, off the device thread)."""
        if self._memory_cache is None:
            return [None] * len(candidates)
        got = self._memory_cache.get([c.id for c in candidates if c.id])
        return [got.get(c.id) if c.id else None for c in candidates]

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


def _page(result: SearchResult, offset: int) -> SearchResult:
    """Drop the first ``offset`` hits (ranks stay those of the whole list)."""
    if offset:
        result.hits = result.hits[offset:]
    return result


def _model_name(pipe: Pipeline) -> str:
    """``mmr/<checkpoint folder>`` for a reranker, ``mmr/first-stage`` without one."""
    spec = pipe.config.reranker
    if spec is not None and spec.params.get("checkpoint"):
        return f"mmr/{Path(str(spec.params['checkpoint'])).resolve().name}"
    return "mmr/first-stage"
