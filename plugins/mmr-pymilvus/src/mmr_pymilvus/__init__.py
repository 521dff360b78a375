"""A pymilvus ``model``-style rerank function backed by ``mmr serve``.

:class:`MMRRerankFunction` has pymilvus' rerank-function contract -- ``fn(query, documents,
top_k=5) -> list[RerankResult]``, best first, each with ``text``, ``score`` and ``index`` -- and
scores through the server's Cohere v2 endpoint (``POST /v2/rerank``). The score is the
reranker's logit, the ``score`` of ``mmr search --rerank``.
"""

from __future__ import annotations

import os
from typing import List, Optional

import requests
from pymilvus.model.base import BaseRerankFunction, RerankResult

__all__ = ["MMRRerankFunction", "MMRRerankError"]
__version__ = "0.1.0"


class MMRRerankError(RuntimeError):
    """The server refused the request; ``status`` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"mmr serve answered {status}: {message}")
        self.status = status


class MMRRerankFunction(BaseRerankFunction):
    """Rerank documents (indexed paths, ids, or data-URI images) with an ``mmr serve`` server.

    Args:
        url: the server's base URL.
        api_key: sent as ``Authorization: Bearer``; default ``$MMR_API_KEY`` (none if unset).
        model_name: sent as the request's ``model`` (the server serves one reranker and ignores it).
        timeout: seconds per request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None, model_name: str = "mmr",
                 timeout: float = 60.0, session: Optional[requests.Session] = None):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("MMR_API_KEY")
        self.model_name = model_name
        self.timeout = timeout
        self._session = session or requests.Session()

    def __call__(self, query: str, documents: List[str], top_k: int = 5) -> List[RerankResult]:
        if not documents:
            return []
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model_name, "query": query, "documents": list(documents), "top_n": top_k}
        resp = self._session.post(f"{self.url}/v2/rerank", json=body, headers=headers, timeout=self.timeout)
        if resp.status_code != 200:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise MMRRerankError(resp.status_code, message)
        return [RerankResult(text=documents[r["index"]], score=r["relevance_score"], index=r["index"]) for r in resp.json()["results"]]
