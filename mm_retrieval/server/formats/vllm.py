"""vLLM's rerank API (Jina-compatible): ``POST /v1/rerank``, and ``POST /rerank`` with ``documents``.

Request (vLLM ``entrypoints/pooling/scoring/protocol.py`` ``RerankRequest``): ``model``
(optional), ``query``, ``documents`` (a string, a ``{"content": [part]}`` object, or a list of
them), ``top_n`` (0 or less: all); vLLM's other fields (``truncate_prompt_tokens``, ``priority``,
...) are accepted and ignored. A content part is ``{"type": "image_url", "image_url": {"url":
"data:image/...;base64,..."}}`` (an inline image) or ``{"type": "text", "text": ...}`` (a
reference); one part per document, as in vLLM.

Response (``RerankResponse``): ``{"id", "model", "usage": {"prompt_tokens", "total_tokens"},
"results": [{"index", "document": {"text", "multi_modal"}, "relevance_score"}]}``, best first.
Errors: ``{"error": {"message", "type", "param", "code"}}``, 400 for a request it can't use.

Milvus' ``vllm`` rerank provider posts ``{"query", "documents"}`` to ``ENDPOINT/rerank``, which
is why ``/rerank`` answers in this format when the body has ``documents``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..documents import Document, check_count, image_from_part
from ..engine import Engine
from ..errors import ApiError
from .common import references


class ImageUrl(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    url: str = Field(description="data:image/...;base64,... (remote URLs are not fetched)")
    detail: Optional[str] = None


class ImagePart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["image_url"]
    image_url: ImageUrl


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


ContentPart = Annotated[Union[ImagePart, TextPart], Field(discriminator="type")]


class MultiModalDocument(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    content: list[ContentPart]


ScoreInput = Union[str, MultiModalDocument]


class VllmRerankRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: Optional[str] = Field(None, description="Accepted and ignored: the server serves one reranker.")
    query: str
    documents: Union[ScoreInput, list[ScoreInput]]
    top_n: int = Field(0, description="How many results to return; 0 or less: all.")


class VllmDocument(BaseModel):
    text: Optional[str] = None
    multi_modal: Optional[list[dict[str, Any]]] = None


class VllmResult(BaseModel):
    index: int
    document: VllmDocument
    relevance_score: float


class VllmUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class VllmRerankResponse(BaseModel):
    id: str
    model: str
    usage: VllmUsage
    results: list[VllmResult]


async def rerank(engine: Engine, req: VllmRerankRequest) -> dict:
    docs = req.documents if isinstance(req.documents, list) else [req.documents]
    ranking = await engine.rerank(req.query, _documents(docs, engine))
    order = ranking.order[: req.top_n] if req.top_n > 0 else ranking.order
    tokens = ranking.query_tokens * len(docs)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": engine.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": [{"index": i, "document": _echo(docs[i]), "relevance_score": float(ranking.scores[i])} for i in order],
    }


def _documents(docs: list, engine: Engine) -> list[Document]:
    check_count(len(docs), engine.config)
    out: list[Document] = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            out.extend(references([d], engine.config))
            continue
        if len(d.content) != 1:
            raise ApiError(422, f"document {i}: a content list must hold exactly one part (an image_url or a text), got {len(d.content)}",
                           param="documents")
        part = d.content[0].model_dump()
        out.append(image_from_part(part, engine.config, f"document {i}"))
    return out


def _echo(doc) -> dict:
    """What vLLM puts in ``results[].document``: the text, or the content parts as sent."""
    if isinstance(doc, str):
        return {"text": doc, "multi_modal": None}
    parts = []
    for p in doc.content:  # known fields only: extra ones are accepted, not echoed
        if isinstance(p, TextPart):
            parts.append({"type": "text", "text": p.text})
        else:
            image = {"url": p.image_url.url, **({"detail": p.image_url.detail} if p.image_url.detail is not None else {})}
            parts.append({"type": "image_url", "image_url": image})
    return {"text": None, "multi_modal": parts}
