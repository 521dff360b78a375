"""How ``mmr search`` finds a running ``mmr serve`` and asks it instead of loading models.

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


def search(url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """``POST /search`` on the server at ``url``: the ``mmr search --json`` document. A request
    the server refuses becomes an :class:`InputError` with its message; a server that cannot be
    reached or fails, an :class:`MMRError`."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url.rstrip('/')}/search", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with _opener().open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = _detail(e)
        if e.code == 401:
            raise InputError(f"the server at {url} wants an API key: set MMR_API_KEY ({detail})") from None
        if 400 <= e.code < 500:
            raise InputError(detail) from None
        raise MMRError(f"the server at {url} failed the search (HTTP {e.code}): {detail}") from None
    except (OSError, ValueError) as e:
        raise MMRError(f"cannot reach the server at {url}: {e}; is `mmr serve` running there?") from None


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
    import base64

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
