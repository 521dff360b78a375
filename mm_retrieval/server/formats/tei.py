"""Hugging Face Text Embeddings Inference: ``POST /rerank`` with ``texts``.

Request (TEI ``router/src/http/types.rs`` ``RerankRequest``): ``query``, ``texts``,
``truncate`` (bool or null), ``truncation_direction`` (``"Left"``/``"Right"``), ``raw_scores``,
``return_text``. Response: a bare JSON array of ``{"index", "text"?, "score"}``, one per text,
best first; ``text`` only when ``return_text``. Errors: ``{"error", "error_type"}`` with 400
``empty`` (no texts), 413 ``validation`` (too many texts or too large a body), 422 (a text that
is no usable document), 429 ``overloaded``.

TEI squashes scores with a sigmoid unless ``raw_scores``; here the score is always the reranker's
logit (see docs/serving.md), because a sigmoid of ``100 x cosine`` is 1.0 for every candidate and
would erase the ranking that clients such as Milvus sort by.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from .common import references


class TeiRerankRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    query: str
    texts: list[str] = Field(description="Indexed paths or ids, or images as data:image/...;base64 URIs.")
    truncate: Optional[bool] = Field(None, description="Accepted; queries longer than the text tower's context are always truncated.")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    raw_scores: bool = Field(False, description="Accepted; the score is always the reranker's logit.")
    return_text: bool = False


class TeiRank(BaseModel):
    index: int
    text: Optional[str] = None
    score: float


async def rerank(engine: Engine, req: TeiRerankRequest) -> list[dict]:
    ranking = await engine.rerank(req.query, references(req.texts, engine.config))
    out = []
    for i in ranking.order:
        rank: dict = {"index": i}
        if req.return_text:
            rank["text"] = req.texts[i]
        rank["score"] = float(ranking.scores[i])
        out.append(rank)
    return out
