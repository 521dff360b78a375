"""The device side of the server: score a batch of jobs with one text-encoder forward, one
image-encoder forward (for inline images only) and one reranker call.

Every job is a query with its candidates. The batch goes to the reranker's
:meth:`~mm_retrieval.stages.base.Reranker.score_batch` as (query, hits) requests, so a reranker
that batches (the built-in cross_attention one: each (query, candidate) pair is one row) lets
concurrent requests with different queries and different candidates share a forward without
scoring anyone's query against anyone else's images. The reranker's own math, so a job's scores
equal what ``Pipeline.search`` computes for the same candidates, up to float rounding.

Scores:

* ``retrieval`` -- the first stage's similarity, exactly as the store defines it: the inner
  product of the L2-normalised query and image embeddings (cosine) for ``IP``/``COSINE``, minus
  the squared L2 distance for ``L2``. For indexed items it uses the vector stored in Milvus.
* ``scores`` -- the reranker's score (the ``score`` of ``mmr search --rerank``), or the
  retrieval score itself when the server has no reranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..query import Query, encode_queries
from ..stages.base import Encoder, Reranker
from ..types import Hit
from .documents import Candidate
from .errors import ApiError


@dataclass
class ScoreJob:
    """One request's work for the device: a query and the candidates to score for it."""

    query: str | Query  # a Query already encoded (by an earlier job) is not encoded again
    candidates: list[Candidate] = field(default_factory=list)
    retrieval: np.ndarray | None = None  # known first-stage scores (the search path); else computed
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


class DeviceScorer:
    """``scorer(jobs) -> results``; called on the batcher's device thread only."""

    def __init__(self, encoder: Encoder, reranker: Reranker | None, metric: str):
        self.encoder = encoder
        self.reranker = reranker
        self.metric = metric

    def __call__(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult]:
        queries: dict[str, Query] = {}
        for job in jobs:
            if isinstance(job.query, Query):
                queries.setdefault(job.query.text, job.query)
            else:
                queries.setdefault(job.query, Query(job.query, self.encoder))
        encode_queries(list(queries.values()))  # one text forward: embeddings and token features
        of = {id(job): queries[_text(job)] for job in jobs}
        image_tokens = self._encode_inline(jobs)

        retrievals = []
        for job in jobs:
            if job.retrieval is not None:
                retrievals.append(np.asarray(job.retrieval, dtype=np.float32))
            elif job.candidates:
                vectors = np.stack([c.vector for c in job.candidates])
                retrievals.append(similarity(vectors, of[id(job)].embedding(), self.metric))
            else:
                retrievals.append(np.zeros(0, np.float32))

        if self.reranker is None:
            scores = [r.astype(np.float64) for r in retrievals]
        else:
            requests = [(of[id(job)], _hits(j, job, r)) for j, (job, r) in enumerate(zip(jobs, retrievals))]
            scores = [np.asarray(s, dtype=np.float64) for s in self.reranker.score_batch(requests, image_tokens=image_tokens)]
        out = []
        for job, s, r in zip(jobs, scores, retrievals):
            feats = of[id(job)].text_features()
            out.append(ScoreResult(scores=s, retrieval=r.astype(np.float64), query_tokens=int(feats.mask.sum()),
                                   embedding=feats.embedding if job.want_embedding else None))
        return out

    def _encode_inline(self, jobs: Sequence[ScoreJob]) -> dict[str, np.ndarray]:
        """Images sent inline: one image-encoder forward for all of the batch's. Sets each one's
        vector; returns its patch tokens by hit id when the reranker reads them. Nothing is
        written to the collection or the cache."""
        import torch

        todo = [(j, i) for j, job in enumerate(jobs) for i, c in enumerate(job.candidates) if c.pixels is not None]
        if not todo:
            return {}
        rr = self.reranker
        if rr is not None and not rr.reads_image_tokens:
            raise ApiError(422, f"this server's reranker ({rr.label}) scores indexed images only (it reads what `mmr index` "
                                "cached for each image); index the image first and send its path or id, or serve a reranker "
                                "that reads the encoder's image tokens (the built-in cross_attention one)")
        with_tokens = rr is not None
        pixels = torch.stack([jobs[j].candidates[i].pixels for j, i in todo])
        emb, raw = self.encoder.encode_pixels(pixels, with_tokens=with_tokens)
        tokens = {}
        for k, (j, i) in enumerate(todo):
            candidate = jobs[j].candidates[i]
            candidate.vector, candidate.pixels = emb[k], None
            if with_tokens:
                tokens[_inline_id(j, i)] = raw[k]
        return tokens


def _text(job: ScoreJob) -> str:
    return job.query.text if isinstance(job.query, Query) else job.query


def _hits(j: int, job: ScoreJob, retrieval: np.ndarray) -> list[Hit]:
    """Job ``j``'s candidates as first-stage hits: indexed ones by id, inline ones by a key that
    is never an item id (their patch tokens travel beside, see :meth:`DeviceScorer._encode_inline`)."""
    return [Hit(id=c.id or _inline_id(j, i), path="", score=float(r), retrieval_score=float(r))
            for i, (c, r) in enumerate(zip(job.candidates, retrieval))]


def _inline_id(job: int, index: int) -> str:
    return f"inline-{job}-{index}"
