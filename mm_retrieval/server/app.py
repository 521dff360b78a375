"""The FastAPI application behind ``mmr serve``.

Routes: ``GET /healthz`` (the process is up), ``GET /readyz`` (models loaded; batching stats),
``POST /search`` (``mmr search --json``; by text, image bytes or item id), ``POST /eval``
(``mmr eval --json``: :mod:`.evaluation`), the rerank endpoints of
:mod:`mm_retrieval.server.formats`, and the search page at ``/`` with its routes
(:mod:`mm_retrieval.server.web`). OpenAPI at ``/openapi.json``, interactive docs at ``/docs`` and
``/redoc`` (their scripts served by the server itself, so they work offline). Every request is
logged by :class:`~.middleware.AccessLog`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import Annotated, Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from pydantic import Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from .. import __version__
from .config import ServerConfig
from .engine import Engine
from .errors import TEI, VLLM, ApiError, family_of
from .evaluation import add_eval_route
from .formats import cohere, native, tei, vllm
from .middleware import DOCS_ASSETS, AccessLog, ApiKeyAuth, BodyLimit
from .web import add_web_routes

log = logging.getLogger(__name__)

DESCRIPTION = """\
Text-to-image search and reranking over one Milvus collection.

**Documents** in the rerank endpoints are images: an indexed item's path exactly as stored (what
Milvus' rerank function sends), its 32-character item id, or an image sent inline as
`data:image/...;base64,...` (vLLM: an `image_url` content part). Inline images are encoded on the
fly and never written to the collection.

**Search** (`POST /search`) takes a text `query`, or an `image` (base64 or `data:image/...;base64,`),
or an indexed item's `image_id`; `offset` pages through the ranking. The search page at `/` uses it.
`POST /eval` measures recall on captions a client sends (`mmr eval` through the server), and
`POST /explain` returns the reranker's attention (`mmr explain` and the page).

**Scores** (`relevance_score`, TEI `score`) are the reranker's logit, `scale * cosine +
correction`: the `score` of `mmr search --rerank`, unbounded, higher is better. Without a
reranker they are the first stage's cosine similarity.
"""


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: text a client sent (even a lone surrogate) can always be
    echoed back, so encoding a reply can never fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _rerank_kind(body: Any) -> str:
    """/rerank speaks TEI (``texts``) and vLLM (``documents``: Milvus' vllm provider posts here)."""
    if isinstance(body, dict):
        return "vllm" if "documents" in body and "texts" not in body else "tei"
    return "vllm" if isinstance(body, vllm.VllmRerankRequest) else "tei"


RerankBody = Annotated[
    Union[Annotated[tei.TeiRerankRequest, Tag("tei")], Annotated[vllm.VllmRerankRequest, Tag("vllm")]],
    Discriminator(_rerank_kind),
]


def create_app(engine: Engine, config: ServerConfig | None = None, *,
               announce: Callable[[], AbstractContextManager[Any]] | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the engine (models, batcher) and stops it. ``announce``:
    a context entered once the engine is ready and left when shutdown begins (``mmr serve``
    announces itself to ``mmr search`` there: :mod:`.discovery`)."""
    config = config or engine.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            with announce() if announce is not None else nullcontext():
                yield
        finally:
            await engine.stop()

    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN (a blank page offline);
    # fastapi-offline serves the same pages with the assets it ships, under DOCS_ASSETS.
    app = FastAPIOffline(title="mm_retrieval", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                         default_response_class=SafeJSONResponse, static_url=DOCS_ASSETS)
    app.state.engine = engine
    # the last added is the outermost: the key is checked before any body is read, and every
    # request is logged, refused ones too
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(AccessLog)
    _add_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        """Readiness: models loaded and the batcher running (503 until then); batching stats."""
        return SafeJSONResponse(engine.info(), status_code=200 if engine.ready else 503)

    @app.post("/search", tags=["search"], response_model=native.SearchResponse)
    async def search(req: native.SearchRequest):
        """Search by text (`query`), by image (`image`: base64 or a data URI, up to the server's
        --max-image-mb; too large: 413, not an image: 422) or by an indexed item (`image_id`);
        `offset` pages. The reply is the `mmr search --json` document."""
        return SafeJSONResponse(await native.search(engine, req))

    @app.post("/v2/rerank", tags=["rerank"], response_model=cohere.CohereRerankResponse)
    async def cohere_rerank(req: cohere.CohereRerankRequest):
        """Cohere v2 rerank (Milvus' `cohere` rerank provider calls this with `base_url` `http://HOST:PORT/v2`)."""
        return SafeJSONResponse(await cohere.rerank(engine, req))

    @app.post("/rerank", tags=["rerank"], response_model=Union[list[tei.TeiRank], vllm.VllmRerankResponse])
    async def tei_or_vllm_rerank(request: Request, req: RerankBody):
        """TEI rerank (a body with `texts`: a bare array of ranks), or vLLM rerank (a body with
        `documents`, as Milvus' `vllm` provider sends)."""
        if isinstance(req, vllm.VllmRerankRequest):
            request.state.family = VLLM
            return SafeJSONResponse(await vllm.rerank(engine, req))
        return SafeJSONResponse(await tei.rerank(engine, req))

    @app.post("/v1/rerank", tags=["rerank"], response_model=vllm.VllmRerankResponse)
    async def vllm_rerank(req: vllm.VllmRerankRequest):
        """vLLM / Jina rerank; documents may be image content parts."""
        return SafeJSONResponse(await vllm.rerank(engine, req))

    add_eval_route(app, engine)
    add_web_routes(app, engine)
    return app


def _family(request: Request) -> str:
    return getattr(request.state, "family", None) or family_of(request.url.path)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response(_family(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        family = _family(request)
        if family == TEI and _rerank_kind(e.body) == "vllm":
            family = VLLM
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return ApiError(400, f"malformed JSON body: {_describe(errors)}", exact=True).response(family)
        return ApiError(422, f"invalid request: {_describe(errors)}", kind="validation").response(family)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the endpoints"
        return ApiError(e.status_code, message, exact=True).response(_family(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(e).__name__}); see the server log", exact=True).response(_family(request))


def _describe(errors: list[dict]) -> str:
    """Pydantic errors as 'body.field: message'; the offending input is never echoed."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("tei", "vllm"))
        detail = (err.get("ctx") or {}).get("error") if err.get("type") == "json_invalid" else None
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" + (f" ({detail})" if detail else ""))
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more

