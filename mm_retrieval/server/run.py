"""Start the server in the foreground (what ``mmr serve`` calls)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..errors import InputError
from ..pipeline import Pipeline
from .config import ServerConfig
from .discovery import Advert, advertise, client_url, resolved_ref
from .middleware import access_log as access_logger

log = logging.getLogger(__name__)

ACCESS_LOG_FORMAT = "%(asctime)s %(message)s"


class _AccessHandler(logging.StreamHandler):
    """The access log's own stderr handler (a class of its own so a second call replaces it)."""


def configure_access_log(enabled: bool) -> None:
    """Print the access log (one line per request, see :class:`~.middleware.AccessLog`) on stderr,
    or silence it. Its own handler, not propagated: printed once, whatever the root logger does."""
    for handler in [h for h in access_logger.handlers if isinstance(h, _AccessHandler)]:
        access_logger.removeHandler(handler)
    if enabled:
        handler = _AccessHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(ACCESS_LOG_FORMAT))
        access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO if enabled else logging.WARNING)
    access_logger.propagate = False


def serve(pipeline: Pipeline, config: ServerConfig, *, access_log: bool = True, watch: str | None = None) -> None:
    """Load the models (so a bad --db, --model or --rerank fails here with one clear message),
    then serve until interrupted. ``access_log``: one line per request on stderr. While it is
    ready the server announces itself beside the collection (:mod:`.discovery`), so that
    ``mmr search`` on the same database asks it instead of loading the models again.
    ``watch``: also keep the collection in step with this folder (:mod:`mm_retrieval.watch`,
    in a thread of this process, so searches see each sync as it lands)."""
    import threading

    import uvicorn

    from ..watch import FolderWatcher
    from .app import create_app
    from .engine import Engine

    watcher = FolderWatcher(pipeline, watch, log=lambda line: print(line, file=sys.stderr, flush=True)) if watch else None
    engine = Engine(pipeline, config)
    engine.warm_up()
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can search the collection "
                    "(set --api-key or MMR_API_KEY)", config.host)
    configure_access_log(access_log)
    sock = listen(config.host, config.port)  # bound here: the announced address is the real one (also for --port 0)
    announce = _announcer(pipeline, client_url(config.host, sock.getsockname()[1]), api_key=bool(config.api_key))
    # uvicorn's own access log is off: ours leaves out query strings and times each request
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config, announce=announce), host=config.host, port=config.port,
                                           log_level="info", access_log=False))
    stop = threading.Event()
    if watcher is not None:
        threading.Thread(target=watcher.run, args=(stop,), name="mmr-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (connections wait in its backlog until the
    server accepts them); a port in use is an InputError naming it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise InputError(f"--host {host}: cannot listen there ({e})") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                         "(or stop what is using it)") from e
    return sock


def _announcer(pipeline: Pipeline, url: str, *, api_key: bool) -> Callable[[], AbstractContextManager[Any]] | None:
    """What the app enters once ready: the announcement ``mmr search`` looks for (a store with
    a :attr:`~mm_retrieval.stages.base.Store.location` only: the file lives in its collection's cache folder)."""
    store = pipeline.store
    uri = store.location
    if uri is None:
        return None
    spec = pipeline.config.reranker
    advert = Advert(url=url, pid=os.getpid(), db=uri, collection=store.name, api_key=api_key,
                    reranker=resolved_ref(str(spec.params.get("checkpoint") or "")) if spec is not None else None)
    return lambda: advertise(advert)
