"""Cohere's v2 rerank API: ``POST /v2/rerank``.

Request (cohere-python ``v2.client.rerank``): ``model`` (required), ``query``, ``documents``
(strings), ``top_n`` (optional; all when absent), ``max_tokens_per_doc``, ``relevant_spans`` and
``priority`` (accepted, ignored). Response (``V2RerankResponse``): ``{"id", "results": [{"index",
"relevance_score"}], "meta": {"api_version": {"version": "2"}}}``, best first. Errors are
``{"message": ...}`` with 400 for a request it can't use and 401 for a bad key.

This is the endpoint Milvus' model rerank function calls with ``provider: "cohere"`` and
``base_url: "http://HOST:PORT/v2"``: it posts the candidates' ``path`` values as documents.
"""

from __future__ import annotations

import uuid
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from ..errors import ApiError
from .common import references


class CohereRerankRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(description="Accepted and ignored: the server serves one reranker.")
    query: str
    documents: list[str] = Field(description="Indexed paths or ids, or images as data:image/...;base64 URIs.")
    top_n: Optional[int] = Field(None, description="How many results to return (default: all).")
    max_tokens_per_doc: Optional[int] = None


class CohereResult(BaseModel):
    index: int
    relevance_score: float


class CohereApiVersion(BaseModel):
    version: str = "2"


class CohereMeta(BaseModel):
    api_version: CohereApiVersion = CohereApiVersion()


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: CohereMeta


async def rerank(engine: Engine, req: CohereRerankRequest) -> dict:
    if req.top_n is not None and req.top_n < 1:
        raise ApiError(400, f"top_n must be at least 1, got {req.top_n}", param="top_n")
    ranking = await engine.rerank(req.query, references(req.documents, engine.config))
    order = ranking.order[: req.top_n] if req.top_n is not None else ranking.order
    return {
        "id": str(uuid.uuid4()),
        "results": [{"index": i, "relevance_score": float(ranking.scores[i])} for i in order],
        "meta": {"api_version": {"version": "2"}},
    }
