"""The search page of ``mmr serve``: static HTML, CSS and vanilla JS (no build step), and the few
JSON/image routes it uses beside ``POST /search``.

* ``GET /`` (also ``/ui``) -- the page; ``GET /static/{app.js,app.css}`` -- its code;
* ``GET /collection`` -- what the page needs to draw its controls (reranker? text vectors? limits);
* ``GET /thumb/{id}``, ``GET /image/{id}`` -- an indexed item's image, resized JPEG (see :mod:`.media`);
* ``POST /explain`` -- the reranker's attention grids for (query, item), drawn by the page on a canvas.

The page and its static files need no API key (they hold no data); everything they fetch does.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..search import MAX_CANDIDATES
from .engine import Engine
from .errors import ApiError
from .media import Rendered

STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


class ExplainRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    query: str = Field(description="The text query whose attention to show.")
    id: str = Field(pattern=r"^[0-9a-f]{32}$", description="An indexed item's id, as /search returns it.")


class ExplainResponse(BaseModel):
    query: str
    id: Optional[str]
    words: list[str] = Field(description="Query words; maps[i] is word i's attention.")
    grid: list[int] = Field(description="[rows, cols] of image patches (over the centre square the encoder sees).")
    layers: int = Field(description="Attention layers of the reranker (the maps are averaged over them).")
    heads: int
    maps: list[list[list[float]]] = Field(description="[words][rows][cols], averaged over heads and layers; each sums to 1.")
    head_maps: list[list[list[list[float]]]] = Field(description="[heads][words][rows][cols], averaged over layers.")
    score: float = Field(description="The reranker's score of this pair.")
    retrieval_score: float = Field(description="The first stage's similarity of this pair.")


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def add_web_routes(app: FastAPI, engine: Engine) -> None:
    """Mount the page and its routes on ``app``."""

    def page() -> Response:
        # no-cache: a browser revalidates, so an upgraded server's page is picked up at once
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(page)
    app.get("/ui", include_in_schema=False)(page)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: nothing else on disk is reachable from here
            raise ApiError(404, f"no static file {name[:80]!r}")
        return Response(_asset(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/collection", tags=["web"])
    async def collection() -> dict:
        """What the search page shows and offers: the collection, whether a reranker and text
        vectors are there (and so which modes work), search defaults and request limits."""
        store = engine.pipeline.store
        items, with_text = await engine._threaded(lambda: (store.count(), store.count_with_text()))
        defaults = engine.pipeline.config.search
        return {
            "collection": store.name, "items": items, "items_with_text": with_text, "model": engine.model_name,
            "reranker": engine.has_reranker,
            "explain": engine.has_reranker and engine.reranker.can_explain,
            "modes": ["auto", "image", "text", "hybrid"] if with_text else ["image"],
            "defaults": {"k": defaults.k, "candidates": defaults.candidates, "mode": defaults.mode},
            "limits": {"max_k": MAX_CANDIDATES, "max_query_chars": engine.config.max_query_chars,
                       "max_image_bytes": engine.config.max_image_bytes},
        }

    @app.get("/thumb/{item_id}", tags=["web"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}})
    async def thumb(item_id: str, request: Request) -> Response:
        """An indexed item's thumbnail (JPEG, longest side ``thumb_size``); only for ids in the
        collection whose file is where the collection recorded it."""
        return _image_response(await run_in_threadpool(engine.media.render, item_id, thumb=True), request)

    @app.get("/image/{item_id}", tags=["web"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG of the whole image"}})
    async def image(item_id: str, request: Request) -> Response:
        """An indexed item's whole image, re-encoded as JPEG (at most ``max_view_side`` px)."""
        return _image_response(await run_in_threadpool(engine.media.render, item_id, thumb=False), request)

    @app.post("/explain", tags=["web"], response_model=ExplainResponse)
    async def explain(req: ExplainRequest) -> dict:
        """The reranker's cross-attention over an indexed image, per query word and per head
        (what ``mmr explain`` draws), as grids for the page to draw."""
        return await engine.explain(req.query, req.id)


def _image_response(r: Rendered, request: Request) -> Response:
    headers = {"Cache-Control": "private, max-age=3600", "ETag": r.etag}
    if request.headers.get("if-none-match") == r.etag:
        return Response(status_code=304, headers=headers)
    return Response(r.body, media_type=r.media_type, headers=headers)
