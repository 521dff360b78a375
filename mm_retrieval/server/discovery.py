"""How ``mmr search`` (``eval``, ``explain``) finds a running ``mmr serve`` and asks it instead
of loading models.

A server announces itself in a small JSON file in its collection's cache folder, beside a Milvus
Lite database (``mmr.db.mmr/<collection>/server.json``; for a Milvus server URI under
``$MMR_CACHE_DIR``): its address, its process id, the collection and its reranker. The file is
written once the models are loaded and removed when the server shuts down. A file left behind by
a killed server is stale: its process is gone, or its address does not answer ``/healthz``; a
client ignores it.

Light on purpose: the CLI imports this before deciding whether to load torch at all, so it uses
only the standard library (urllib, json).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, MMRError

if TYPE_CHECKING:
    from ..types import SearchResult

log = logging.getLogger(__name__)

FILE_NAME = "server.json"
HEALTH_TIMEOUT_S = 5.0  # a live server answers /healthz in milliseconds; a refused connection (a stale file) fails at once


@dataclass(frozen=True)
class Advert:
    """What a running server says about itself."""

    url: str  # http://HOST:PORT, an address this machine can reach it at
    pid: int
    db: str
    collection: str
    reranker: str | None = None  # the --rerank it was started with (a resolved path when it is one)
    api_key: bool = False  # whether it wants a key (the key itself is never written down)


def advert_path(db: str, collection: str) -> Path:
    """Where the server for ``collection`` in database ``db`` announces itself."""
    from ..tokencache import cache_root

    return cache_root(db, collection) / FILE_NAME


def client_url(host: str, port: int) -> str:
    """An address a client on this machine reaches a server listening on ``host`` at."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def resolved_ref(ref: str | None) -> str | None:
    """A reranker reference as compared between client and server: an existing path resolved,
    anything else (a hub name) as given."""
    if not ref:
        return None
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


@contextlib.contextmanager
def advertise(advert: Advert) -> Iterator[Path]:
    """Write ``advert`` to its file for the duration of the block; removed afterwards unless
    another server has replaced it since."""
    path = advert_path(advert.db, advert.collection)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE_NAME}.{advert.pid}")
    tmp.write_text(json.dumps(asdict(advert)) + "\n")
    os.replace(tmp, path)  # never a half-written file
    log.info("announced %s in %s", advert.url, path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == advert.pid:
                path.unlink()


def find_server(db: str, collection: str, *, timeout: float = HEALTH_TIMEOUT_S) -> Advert | None:
    """The server announced for ``collection`` in ``db``, if its process is alive and its address
    answers; None otherwise (no file, an unreadable one, or a stale one)."""
    path = advert_path(db, collection)
    try:
        doc = json.loads(path.read_text())
        advert = Advert(**{k: doc[k] for k in ("url", "pid", "db", "collection")},
                        reranker=doc.get("reranker"), api_key=bool(doc.get("api_key")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(int(advert.pid)):
        log.info("ignoring %s: process %s is gone", path, advert.pid)
        return None
    if not healthy(advert.url, timeout=timeout):
        log.info("ignoring %s: %s does not answer", path, advert.url)
        return None
    return advert


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def healthy(url: str, *, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether ``url`` answers ``GET /healthz`` with 200."""
    try:
        with _opener().open(f"{url.rstrip('/')}/healthz", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _opener() -> urllib.request.OpenerDirector:
    # no proxy: the server is on this machine (an http_proxy setting must not route 127.0.0.1 away)
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerRefused(InputError):
    """A request the server refused (4xx): its message, and the HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def post(url: str, route: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """``POST route`` with a JSON ``body`` on the server at ``url``: its JSON reply. A request the
    server refuses becomes a :class:`ServerRefused` (an :class:`InputError`) with its message; a
    server that cannot be reached or fails, an :class:`MMRError`."""
    req = urllib.request.Request(f"{url.rstrip('/')}{route}", data=json.dumps(body).encode(), headers=_headers(api_key), method="POST")
    return json.loads(_fetch(url, req, route, timeout))


def get(url: str, route: str, *, api_key: str | None = None, timeout: float = 300.0) -> bytes:
    """``GET route`` on the server at ``url``: the body (errors as :func:`post`)."""
    return _fetch(url, urllib.request.Request(f"{url.rstrip('/')}{route}", headers=_headers(api_key)), route, timeout)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _fetch(url: str, req: urllib.request.Request, route: str, timeout: float) -> bytes:
    try:
        with _opener().open(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        detail = _detail(e)
        if e.code == 401:
            raise InputError(f"the server at {url} wants an API key: set MMR_API_KEY ({detail})") from None
        if 400 <= e.code < 500:
            raise ServerRefused(detail, e.code) from None
        raise MMRError(f"the server at {url} failed {route} (HTTP {e.code}): {detail}") from None
    except (OSError, ValueError) as e:
        raise MMRError(f"cannot reach the server at {url}: {e}; is `mmr serve` running there?") from None


def search(url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """``POST /search`` on the server at ``url``: the ``mmr search --json`` document."""
    return post(url, "/search", body, api_key=api_key, timeout=timeout)


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(e.read())
    except (OSError, ValueError):
        return f"HTTP {e.code}"
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    return detail if isinstance(detail, str) else json.dumps(detail)


def remote_search(url: str, query: str | None = None, *, image: str | Path | None = None, mode: str | None = None,
                  k: int | None = None, candidates: int | None = None, filter: str = "", rerank: bool | None = None,
                  group_by_video: bool | None = None, api_key: str | None = None, min_score: float | None = None,
                  sort: str | None = None, collapse_duplicates: bool = False) -> SearchResult:
    """``Pipeline.search`` answered by the server at ``url``: the same options and the same
    result, the query label included (an image query is read here and sent inline)."""
    from ..search import query_label, read_image_query
    from ..types import SearchResult

    body: dict[str, Any] = {"query": query, "mode": mode, "k": k, "candidates": candidates, "rerank": rerank,
                            "group_by_video": group_by_video, "min_score": min_score, "sort": sort or None}
    body = {key: v for key, v in body.items() if v is not None}
    if collapse_duplicates:
        body["collapse_duplicates"] = True
    if filter:
        body["filter"] = filter
    if image is not None:
        body["image"] = base64.b64encode(read_image_query(image)).decode("ascii")
    result = SearchResult.from_dict(search(url, body, api_key=api_key))
    result.query = query_label(query, image)
    return result


def remote_eval(url: str, queries: dict[str, set[str]], captions: list[str], *, mode: str, candidates: int, rerank: bool,
                require_indexed: bool, api_key: str | None = None) -> dict[str, Any]:
    """``evaluate`` answered by the server at ``url`` (``POST /eval``): ``captions`` (the usable
    ones of ``queries``: caption -> relevant ids) ranked by its pipeline; the ``mmr eval --json``
    document. ``require_indexed``: an error naming how to index when the collection lacks some
    relevant image (the server indexes nothing)."""
    body = {"queries": [{"text": c, "relevant": sorted(queries[c])} for c in captions], "mode": mode,
            "candidates": candidates, "rerank": rerank, "require_indexed": require_indexed}
    try:
        return post(url, "/eval", body, api_key=api_key, timeout=3600.0)
    except ServerRefused as e:
        if e.status == 409:
            raise InputError(f"{e}: index them first (`mmr index TABLE`; stop `mmr serve` first when the database is a "
                             "Milvus Lite file, which one process opens at a time), or pass --no-index to evaluate against "
                             "what is indexed") from None
        raise


def remote_explain(url: str, query: str, image: str, *, layer: int | None = None, head: int | None = None,
                   api_key: str | None = None) -> tuple[dict[str, Any], Any]:
    """``attention_maps`` answered by the server at ``url`` (``POST /explain``), for ``image``: an
    image file (the item indexed from it, else the file's bytes) or an indexed item's id. Returns
    (the server's reply, the PIL image to draw the maps over: the file, else the item's image
    from the server)."""
    from ..decode import DecodeError, decode_image, is_video
    from ..search import read_image_query

    body: dict[str, Any] = {"query": query, "layer": layer, "head": head}
    p = Path(image).expanduser()
    if p.is_file():
        path = str(p.resolve())
        data = read_image_query(path)
        try:
            doc = post(url, "/explain", {**body, "path": path}, api_key=api_key)
        except ServerRefused as e:
            if e.status != 404:
                raise
            doc = post(url, "/explain", {**body, "image": base64.b64encode(data).decode("ascii")}, api_key=api_key)
    elif len(image) == 32 and not image.strip("0123456789abcdef"):
        doc = post(url, "/explain", {**body, "id": image}, api_key=api_key)
        local = Path(doc.get("path") or "")
        # the item's file when this machine sees it (an image: exactly what the server read), else the server's render
        data = local.read_bytes() if local.is_file() and not is_video(str(local)) else get(url, f"/image/{image}", api_key=api_key)
    else:
        raise InputError(f"{image!r} is neither an image file nor the id of an indexed image")
    try:
        pil = decode_image(data).convert("RGB")
    except DecodeError as e:
        raise InputError(f"{image} is not a usable image: {e}") from e
    return doc, pil
