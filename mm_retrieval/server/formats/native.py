"""The native API: ``POST /search``, answered with the ``mmr search --json`` document."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ...pipeline import MAX_CANDIDATES
from ..documents import check_text
from ..engine import Engine

MAX_FILTER_CHARS = 4096


class SearchRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    query: str = Field(description="What to look for, in words.")
    k: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES, description="Hits to return (default: the pipeline's, 10).")
    candidates: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES, description="First-stage candidates the reranker rescores (default 100).")
    filter: str = Field("", max_length=MAX_FILTER_CHARS, description='Milvus boolean expression, e.g. metadata["year"] >= 2020.')
    rerank: Optional[bool] = Field(None, description="false: first stage only; default: rerank when the server has a reranker.")
    mode: Optional[Literal["auto", "image", "text", "hybrid"]] = Field(
        None, description="Search image vectors, the items' text vectors, or both fused (default auto: hybrid when there are text vectors).")


class SearchHit(BaseModel):
    rank: int
    id: str
    path: str
    score: float
    retrieval_score: float
    caption: Optional[str] = None
    metadata: dict[str, Any] = {}
    has_image: Optional[bool] = Field(None, description="Present (false) only for text-only items.")
    image_score: Optional[float] = Field(None, description="Hybrid mode: the image-vector similarity.")


class SearchResponse(BaseModel):
    query: str
    mode: str
    hits: list[SearchHit]
    reranked: bool
    timings_ms: dict[str, float]


async def search(engine: Engine, req: SearchRequest) -> dict:
    check_text(req.filter, "the filter", MAX_FILTER_CHARS)
    result = await engine.search(req.query, k=req.k, candidates=req.candidates, filter=req.filter, rerank=req.rerank, mode=req.mode)
    return result.to_dict()
