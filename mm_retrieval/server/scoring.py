"""The device side of the server: score a batch of jobs with one text-encoder forward, one
image-encoder forward (for inline images only) and one reranker forward.

Every job is a query with its candidates. The reranker runs in its *pairs* layout: each
(query, candidate) pair of every job is one row, so concurrent requests with different queries
and different candidates share a forward without scoring anyone's query against anyone else's
images. The math is the reranker's own (:meth:`mm_retrieval.models.reranker.Reranker.forward`),
so a job's scores equal what ``Pipeline.search`` computes for the same candidates, up to float
rounding.

Scores:

* ``retrieval`` -- the first stage's similarity, exactly as the store defines it: the inner
  product of the L2-normalised query and image embeddings (cosine) for ``IP``/``COSINE``, minus
  the squared L2 distance for ``L2``. For indexed items it uses the vector stored in Milvus.
* ``scores`` -- the reranker's logit ``scale * retrieval + head(features)`` (the ``score`` of
  ``mmr search --rerank``), or the retrieval score itself when the server has no reranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..types import Hit
from .documents import Candidate
from .errors import ApiError


@dataclass
class ScoreJob:
    """One request's work for the device. ``memory[i]`` is candidate i's cached reranker memory,
    or None when the device must derive it (raw tokens) or encode it (inline image)."""

    query: str
    candidates: list[Candidate] = field(default_factory=list)
    retrieval: np.ndarray | None = None  # known first-stage scores (the search path); else computed
    memory: list[np.ndarray | None] = field(default_factory=list)
    want_embedding: bool = False

    @property
    def size(self) -> int:
        return max(1, len(self.candidates))


@dataclass
class ScoreResult:
    scores: np.ndarray  # [N] final scores (float64)
    retrieval: np.ndarray  # [N] first-stage scores
    embedding: np.ndarray | None  # [D] the query's embedding, when asked for
    query_tokens: int  # real (non-padding) tokens of the query


def similarity(vectors: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """The store's similarity of each row of ``vectors`` [N, D] to ``query`` [D] (higher is better)."""
    v = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(query, dtype=np.float32)
    if metric.upper() == "L2":
        return -((v - q) ** 2).sum(axis=1)
    return v @ q


def cross_attention_capable(reranker: Any) -> bool:
    """Whether the reranker exposes the pieces batching needs (the built-in cross_attention one does)."""
    return all(hasattr(reranker, a) for a in ("model", "project", "memories", "memory_cache"))


class DeviceScorer:
    """``scorer(jobs) -> results``; called on the batcher's device thread only."""

    def __init__(self, encoder: Any, reranker: Any | None, metric: str):
        self.encoder = encoder
        self.reranker = reranker
        self.metric = metric

    def __call__(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult]:
        rr = self.reranker
        batched = rr is not None and cross_attention_capable(rr)
        for job in jobs:
            if len(job.memory) != len(job.candidates):
                job.memory = [None] * len(job.candidates)
        self._encode_inline(jobs, with_tokens=batched)
        if batched:
            self._derive_missing_memory(jobs)
        queries = list(dict.fromkeys(job.query for job in jobs))
        need_tokens = batched and any(job.candidates for job in jobs)
        emb, tokens, mask = self.encoder.encode_text_tokens(queries, with_tokens=need_tokens)
        emb_np = emb.float().cpu().numpy()
        q_of = {q: i for i, q in enumerate(queries)}
        n_tokens = mask.sum(1).tolist()

        retrievals = []
        for job in jobs:
            if job.retrieval is not None:
                retrievals.append(np.asarray(job.retrieval, dtype=np.float32))
            elif job.candidates:
                vectors = np.stack([c.vector for c in job.candidates])
                retrievals.append(similarity(vectors, emb_np[q_of[job.query]], self.metric))
            else:
                retrievals.append(np.zeros(0, np.float32))

        if batched:
            scores = self._rerank_pairs(jobs, retrievals, tokens, mask, [q_of[j.query] for j in jobs])
        elif rr is not None:
            scores = [self._rerank_generic(job, r) for job, r in zip(jobs, retrievals)]
        else:
            scores = [r.astype(np.float64) for r in retrievals]
        return [
            ScoreResult(scores=s, retrieval=r.astype(np.float64), embedding=emb_np[q_of[j.query]] if j.want_embedding else None,
                        query_tokens=int(n_tokens[q_of[j.query]]))
            for j, s, r in zip(jobs, scores, retrievals)
        ]

    # ---- pieces ----------------------------------------------------------------------------
    def _encode_inline(self, jobs: Sequence[ScoreJob], *, with_tokens: bool) -> None:
        """Images sent inline: one image-encoder forward for all of the batch's, then the
        reranker's memory projection. Nothing is written to the collection or the cache."""
        import torch

        todo = [(job, i) for job in jobs for i, c in enumerate(job.candidates) if c.pixels is not None]
        if not todo:
            return
        if self.reranker is not None and not with_tokens:
            raise ApiError(422, "this server's reranker scores indexed images only; inline images need the built-in cross_attention reranker")
        pixels = torch.stack([job.candidates[i].pixels for job, i in todo])
        emb, raw = self.encoder.encode_pixels(pixels, with_tokens=with_tokens)
        memory = self.reranker.project(raw) if with_tokens else None
        for k, (job, i) in enumerate(todo):
            job.candidates[i].vector = emb[k]
            job.candidates[i].pixels = None
            if memory is not None:
                job.memory[i] = memory[k]

    def _derive_missing_memory(self, jobs: Sequence[ScoreJob]) -> None:
        """Indexed items whose reranker memory isn't cached yet: derive it from raw tokens
        (written back once, as ``Pipeline.search`` does); an error names ``mmr cache build``."""
        for job in jobs:
            missing = [i for i, m in enumerate(job.memory) if m is None]
            if missing:
                got = self.reranker.memories([job.candidates[i].id for i in missing])
                for k, i in enumerate(missing):
                    job.memory[i] = got[k]

    def _rerank_pairs(self, jobs, retrievals, tokens, mask, query_rows) -> list[np.ndarray]:
        import torch

        rr = self.reranker
        sizes = [len(job.candidates) for job in jobs]
        total = sum(sizes)
        if total == 0:
            return [np.zeros(0) for _ in jobs]
        device = rr.device
        used = int(mask.any(0).nonzero().max()) + 1  # trailing padding never changes a score
        tokens, mask = tokens[:, :used].to(device), mask[:, :used].to(device)
        rows = torch.tensor(np.repeat(query_rows, sizes), device=device)
        memory = torch.from_numpy(np.stack([m for job in jobs for m in job.memory])).to(device)
        retrieval = torch.from_numpy(np.concatenate(retrievals).astype(np.float32)).to(device)
        step = int(rr.config.chunk_size)
        out = []
        with torch.inference_mode(), rr._autocast():
            for s in range(0, total, step):
                e = min(total, s + step)
                r = rows[s:e]
                out.append(rr.model(tokens[r], mask[r], memory[s:e], retrieval[s:e], pairs=True, chunk_size=step).float())
        logits = torch.cat(out).cpu().numpy().astype(np.float64)
        return np.split(logits, np.cumsum(sizes)[:-1])

    def _rerank_generic(self, job: ScoreJob, retrieval: np.ndarray) -> np.ndarray:
        """A third-party reranker stage: scored per job through its own ``score`` (no batching)."""
        hits = [Hit(id=c.id or "", path="", score=float(r), retrieval_score=float(r)) for c, r in zip(job.candidates, retrieval)]
        return np.asarray(self.reranker.score(job.query, hits), dtype=np.float64) if hits else np.zeros(0)
