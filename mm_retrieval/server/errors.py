"""HTTP errors, rendered the way each wire format's own server renders them.

One exception type (:class:`ApiError`) carries the status and message; where it is rendered
decides the body, so a Cohere client gets ``{"message": ...}``, a TEI client
``{"error": ..., "error_type": ...}``, a vLLM/OpenAI client ``{"error": {"message", "type",
"param", "code"}}`` and the native API ``{"detail": ...}``.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ..errors import IncompatibleError, InputError, MMRError, StoreError

COHERE, TEI, VLLM, NATIVE = "cohere", "tei", "vllm", "native"

# TEI's own error_type names (router/src/lib.rs ErrorType, serialised lowercase)
_TEI_TYPES = {400: "empty", 401: "unauthorized", 413: "validation", 422: "validation", 429: "overloaded", 503: "unhealthy"}
# vLLM's ErrorInfo.type values follow OpenAI's exception class names
_OPENAI_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError",
                 422: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """A request the server refuses (4xx) or cannot serve now (5xx), with a message that says why."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None, exact: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind  # overrides the format's default error type name
        self.exact = exact  # keep the status in every format (e.g. 413 for an oversized body)

    def status_for(self, family: str) -> int:
        """TEI answers 413 for too many inputs and 422 for invalid ones; Cohere and vLLM answer 400
        for any request they can't use."""
        if family in (COHERE, VLLM) and not self.exact and self.status in (413, 422):
            return 400
        return self.status

    def response(self, family: str) -> JSONResponse:
        status = self.status_for(family)
        return JSONResponse(error_body(family, status, self.message, param=self.param, kind=self.kind), status_code=status)


def error_body(family: str, status: int, message: str, *, param: str | None = None, kind: str | None = None) -> Any:
    """The JSON body of an error in ``family``'s format."""
    if family == COHERE:
        return {"message": message}
    if family == TEI:
        return {"error": message, "error_type": kind or _TEI_TYPES.get(status, "backend")}
    if family == VLLM:
        return {"error": {"message": message, "type": kind or _OPENAI_TYPES.get(status, "InternalServerError"), "param": param, "code": status}}
    return {"detail": message}


def family_of(path: str) -> str:
    """Which wire format answers errors on ``path`` (before the body says more)."""
    if path.startswith("/v2/rerank"):
        return COHERE
    if path.startswith("/v1/"):
        return VLLM
    if path.rstrip("/") == "/rerank":
        return TEI
    return NATIVE


def from_mmr_error(e: MMRError) -> ApiError:
    """Map the library's errors to HTTP: bad input is the caller's (4xx); a store that may come
    back is 503; anything else is the server's fault (500)."""
    if isinstance(e, IncompatibleError):
        return ApiError(409, str(e))
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    if isinstance(e, StoreError):
        return ApiError(503 if e.retriable else 500, str(e))
    return ApiError(500, str(e))
