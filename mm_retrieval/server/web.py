"""The search page of ``mmr serve``: static HTML, CSS and vanilla JS (no build step), and the few
JSON/image routes it uses beside ``POST /search``.

* ``GET /`` (also ``/ui``) -- the page; ``GET /static/{app.js,app.css}`` -- its code;
* ``GET /collection`` -- what the page needs to draw its controls (reranker? text vectors? limits);
* ``GET /thumb/{id}``, ``GET /image/{id}`` -- an indexed item's image, resized JPEG (a video segment's:
  its representative frame; see :mod:`.media`);
* ``GET|HEAD /video/{id}`` -- an indexed video's file (by a segment's id or the video's), with HTTP
  range requests (206/416), for the page's ``<video>`` player; with an API key also through a
  signed link from ``GET /video-link/{id}`` (a ``<video>`` cannot send the key);
* ``POST /explain`` -- the reranker's attention grids for (query, item), drawn by the page on a canvas.

The page and its static files need no API key (they hold no data); everything they fetch does.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from ..search import MAX_CANDIDATES
from .documents import image_from_base64
from .engine import Engine
from .errors import ApiError
from .media import OpenVideo, Rendered
from .ranges import FileChunks, RangeNotSatisfiable, parse_range

STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


class ExplainRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    query: str = Field(description="The text query whose attention to show.")
    id: Optional[str] = Field(None, pattern=r"^[0-9a-f]{32}$", description="An indexed item's id, as /search returns it.")
    path: Optional[str] = Field(None, min_length=1, max_length=4096, description="Or an indexed item by its path, exactly as stored (resolved); "
                                                               "404 when no item was indexed from it. The server never reads it.")
    image: Optional[str] = Field(None, description="Or any image: its file's bytes as data:image/...;base64,... or bare base64 "
                                                   "(at most --max-image-mb), encoded on the fly and never stored.")
    layer: Optional[int] = Field(None, description="`view` shows this attention layer instead of the mean over layers.")
    head: Optional[int] = Field(None, description="`view` shows this attention head instead of the mean over heads.")


class ExplainResponse(BaseModel):
    query: str
    id: Optional[str] = Field(description="The indexed item explained; null for an inline image.")
    path: Optional[str] = Field(None, description="Its file, as stored; null for an inline image.")
    words: list[str] = Field(description="Query words; maps[i] is word i's attention.")
    grid: list[int] = Field(description="[rows, cols] of image patches (over the centre square the encoder sees).")
    layers: int = Field(description="Attention layers of the reranker (the maps are averaged over them).")
    heads: int
    maps: list[list[list[float]]] = Field(description="[words][rows][cols], averaged over heads and layers; each sums to 1.")
    head_maps: list[list[list[list[float]]]] = Field(description="[heads][words][rows][cols], averaged over layers.")
    score: float = Field(description="The reranker's score of this pair.")
    retrieval_score: float = Field(description="The first stage's similarity of this pair.")
    view: list[list[list[float]]] = Field(description="[words][rows][cols] of the requested `layer` and `head` (the mean over "
                                                      "those not given), unrounded: what `mmr explain --layer/--head` draws.")


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
        """What the search page shows and offers: the collection, whether a reranker, text
        vectors and videos are there (and so which modes and options work), search defaults and
        request limits."""
        store = engine.pipeline.store
        from ..ocr import has_ocr

        items, with_text, videos, ocr = await engine._threaded(
            lambda: (store.count(), store.count_with_text(), engine.media.has_videos(), store.exists() and has_ocr(store)))
        defaults = engine.pipeline.config.search
        return {
            "collection": store.name, "items": items, "items_with_text": with_text, "model": engine.model_name,
            "reranker": engine.has_reranker,
            "explain": engine.has_reranker and engine.reranker.can_explain,
            "videos": videos,  # moments of videos are indexed: the page offers one-per-video grouping
            # ocr: the words read in images (indexed with --ocr)
            "modes": (["auto", "image", "text", "hybrid"] if with_text else ["image"]) + (["ocr"] if ocr else []),
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

    @app.get("/video/{item_id}", tags=["web"], response_class=Response,
             responses={200: {"content": {"video/*": {}}, "description": "the whole video file"},
                        206: {"description": "the requested byte range (Content-Range)"},
                        416: {"description": "a Range the file cannot satisfy"}})
    async def video(item_id: str, request: Request) -> Response:
        """An indexed video's file, for the page's player: ``item_id`` is a segment's id (as
        /search returns it) or the video's own (``video.id``). Supports ``Range: bytes=...``
        (206 with ``Content-Range``; 416 for a range past the end or malformed) and HEAD. 404 for
        an unknown id or an item that is an image; 403 for a file that now resolves outside the
        recorded paths (as /image)."""
        opened = await run_in_threadpool(engine.media.open_video, item_id)
        return _video_response(opened, request)

    app.head("/video/{item_id}", include_in_schema=False)(video)  # the same answer without a body (one operation in the docs)

    @app.get("/video-link/{item_id}", tags=["web"], response_model=VideoLink)
    async def video_link(item_id: str) -> dict:
        """A link to ``GET /video/{item_id}`` that plays without the API key, for a ``<video>``
        element (which cannot send it): signed with the key, for this video only, expiring after
        a few hours. Without a key the plain path (nothing to sign)."""
        import time

        from .middleware import VIDEO_LINK_SECONDS, video_signature

        await run_in_threadpool(engine.media.locate_video, item_id)  # 404/403 as /video would
        key = engine.config.api_key
        if not key:
            return {"url": f"video/{item_id}", "expires": None}
        expires = int(time.time()) + VIDEO_LINK_SECONDS
        return {"url": f"video/{item_id}?expires={expires}&sig={video_signature(key, item_id, expires)}", "expires": expires}

    @app.post("/explain", tags=["web"], response_model=ExplainResponse)
    async def explain(req: ExplainRequest) -> dict:
        """The reranker's cross-attention over an image, per query word and per head (what
        ``mmr explain`` draws), as grids for the page to draw. The image is exactly one of: an
        indexed item's `id`, an indexed item's stored `path`, or an inline `image`."""
        given = [name for name in ("id", "path", "image") if getattr(req, name) is not None]
        if len(given) != 1:
            raise ApiError(422, f"give exactly one of id, path and image (got {', '.join(given) or 'none'})")
        image = image_from_base64(req.image, engine.config, "image") if req.image is not None else None
        return await engine.explain(req.query, req.id, path=req.path, image=image, layer=req.layer, head=req.head)


class VideoLink(BaseModel):
    url: str = Field(description="Relative URL of the video for a <video> element; with an API key it carries a signature.")
    expires: Optional[int] = Field(description="When a signed link stops working (Unix seconds); null without an API key.")


def _image_response(r: Rendered, request: Request) -> Response:
    headers = {"Cache-Control": "private, max-age=3600", "ETag": r.etag}
    if request.headers.get("if-none-match") == r.etag:
        return Response(status_code=304, headers=headers)
    return Response(r.body, media_type=r.media_type, headers=headers)


def _video_response(v: OpenVideo, request: Request) -> Response:
    """200 / 206 / 416 for an opened video; the body streams from ``v.fd`` and closes it."""
    from email.utils import formatdate

    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600", "ETag": v.etag,
               "Last-Modified": formatdate(v.mtime, usegmt=True)}
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header and if_range is not None and if_range != v.etag:  # the file changed since the client's copy: send it whole
        header = None
    try:
        r = parse_range(header, v.size)
    except RangeNotSatisfiable as e:
        v.close()
        return Response(str(e), status_code=416, media_type="text/plain; charset=utf-8",
                        headers={**headers, "Content-Range": f"bytes */{v.size}"})
    start, length, status = (0, v.size, 200) if r is None else (r.start, r.length, 206)
    headers["Content-Length"] = str(length)
    if r is not None:
        headers["Content-Range"] = r.content_range(v.size)
    if request.method == "HEAD":
        v.close()
        return Response(status_code=status, headers=headers, media_type=v.media_type)
    body = FileChunks(v.fd, start, length)
    return StreamingResponse(body, status_code=status, headers=headers, media_type=v.media_type, background=BackgroundTask(body.close))
