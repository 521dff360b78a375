"""LangChain integration for ``mmr serve``: :class:`MMRReranker`, a document compressor.

It posts the documents' image references to the server's Cohere v2 endpoint
(``POST /v2/rerank``) and returns the best ``top_n`` documents, best first, each a copy with
``metadata["relevance_score"]`` set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import httpx
from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field

__all__ = ["MMRReranker", "MMRRerankError"]
__version__ = "0.1.0"


class MMRRerankError(RuntimeError):
    """The server refused the request; ``status`` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"mmr serve answered {status}: {message}")
        self.status = status


class MMRReranker(BaseDocumentCompressor):
    """Rerank image documents with ``mmr serve``.

    Each document's image is ``metadata[reference_key]`` when present, else ``page_content``:
    an indexed path, an item id, or a ``data:image/...;base64`` URI.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    url: str = "http://127.0.0.1:8000"
    api_key: Optional[str] = Field(default_factory=lambda: os.environ.get("MMR_API_KEY"), repr=False)
    top_n: Optional[int] = 3  # None: every document, reordered
    reference_key: str = "path"
    model: str = "mmr"
    timeout: float = 60.0

    def _request(self, documents: Sequence[Document], query: str) -> dict[str, Any]:
        refs = [str(d.metadata.get(self.reference_key) or d.page_content) for d in documents]
        body: dict[str, Any] = {"model": self.model, "query": query, "documents": refs}
        if self.top_n is not None:
            body["top_n"] = self.top_n
        return {"url": f"{self.url.rstrip('/')}/v2/rerank", "json": body, "timeout": self.timeout,
                "headers": {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}}

    @staticmethod
    def _results(resp: httpx.Response, documents: Sequence[Document]) -> list[Document]:
        if resp.status_code != 200:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise MMRRerankError(resp.status_code, message)
        out = []
        for r in resp.json()["results"]:
            doc = documents[r["index"]]
            out.append(Document(page_content=doc.page_content, id=doc.id, metadata={**doc.metadata, "relevance_score": r["relevance_score"]}))
        return out

    def compress_documents(self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None) -> Sequence[Document]:
        """The best ``top_n`` of ``documents`` for ``query``, best first."""
        if not documents:
            return []
        return self._results(httpx.post(**self._request(documents, query)), documents)

    async def acompress_documents(self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        async with httpx.AsyncClient() as client:
            return self._results(await client.post(**self._request(documents, query)), documents)
