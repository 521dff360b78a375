"""ASGI middleware: the access log, the API key and the request-body bound, checked before any
route runs."""

from __future__ import annotations

import hmac
import logging
import time
from urllib.parse import quote

from starlette.exceptions import HTTPException

from .errors import ApiError, family_of

log = logging.getLogger(__name__)
# One INFO line per request; `mmr serve` prints it on stderr unless --no-access-log.
access_log = logging.getLogger("mm_retrieval.server.access")

# Where /docs and /redoc load their scripts and styles from (fastapi-offline's copies).
DOCS_ASSETS = "/docs/assets"
# Liveness/readiness probes, the API docs and the search page's static code never need the key
# (they reveal no data; the page asks for the key before it fetches anything).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                          "/", "/ui", "/static/app.js", "/static/app.css"})
MAX_LOGGED_PATH = 200  # characters of a request path in the access log


class AccessLog:
    """Log ``METHOD PATH STATUS MS`` for every request, refused ones included: the time until
    the response was sent, or 500 when the app failed before answering. Never the query string,
    the headers (the API key) or a body; the path is percent-encoded, so it can't forge log lines."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            ms = (time.perf_counter() - start) * 1000
            access_log.info("%s %s %d %.1f ms", scope["method"], _loggable(scope["path"]), status, ms)


def _loggable(path: str) -> str:
    """``path`` percent-encoded again (as uvicorn logs it: no spaces, control or non-ASCII
    characters), cut short."""
    text = quote(path, errors="backslashreplace")
    return text if len(text) <= MAX_LOGGED_PATH else text[:MAX_LOGGED_PATH] + "..."


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the bound. An HTTPException, so FastAPI's
    body reader passes it on (it turns other errors into 400) and the app renders a 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes:,} bytes; send fewer or smaller documents "
                              "(or start the server with a larger --max-body-mb)")


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413: at once when Content-Length says so, else as
    soon as the streamed body passes the limit (chunked uploads can't sneak past it)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        err = ApiError(413, BodyTooLarge(self.max_bytes).detail, kind="validation", exact=True)
        await err.response(family_of(scope.get("path", "")))(scope, receive, send)


VIDEO_PREFIX = "/video/"
VIDEO_LINK_SECONDS = 6 * 3600  # how long a signed video link plays (a long film, paused, resumed)


def video_signature(api_key: str, item_id: str, expires: int) -> str:
    """The signature of a link to ``GET /video/{item_id}?expires=..&sig=..``: an HMAC of the id
    and the expiry time under the API key. A ``<video>`` element cannot send the key, so the
    page asks for a signed link (``GET /video-link/{id}``, with the key) and streams from it with
    range requests; the link opens that one video only, until it expires."""
    return hmac.new(api_key.encode(), f"video:{item_id}:{expires}".encode(), "sha256").hexdigest()


def _signed_video(scope, api_key: bytes) -> bool:
    """Whether the request is a GET/HEAD of a video with a valid, unexpired signed link."""
    from urllib.parse import parse_qs

    path = scope.get("path", "")
    if scope.get("method") not in ("GET", "HEAD") or not path.startswith(VIDEO_PREFIX):
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        expires, sig = int(query["expires"][0]), query["sig"][0]
    except (KeyError, ValueError, IndexError):
        return False
    if expires < time.time():
        return False
    want = video_signature(api_key.decode(), path[len(VIDEO_PREFIX):], expires)
    return hmac.compare_digest(want.encode(), sig.encode("latin-1", "replace"))


class ApiKeyAuth:
    """When a key is set, require it as ``Authorization: Bearer KEY`` (what the Cohere, TEI and
    vLLM clients send) or ``X-API-Key: KEY``. Compared in constant time. ``GET /video/{id}``
    also accepts a signed link instead (:func:`video_signature`)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or self.expected is None or path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS + "/"):
            return await self.app(scope, receive, send)
        if _signed_video(scope, self.expected):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is not None and hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        reason = "missing API key" if given is None else "invalid API key"
        err = ApiError(401, f"{reason}: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", kind="unauthorized", exact=True)
        await err.response(family_of(scope.get("path", "")))(scope, receive, send)
