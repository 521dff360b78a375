"""Start the server in the foreground (what ``mmr serve`` calls)."""

from __future__ import annotations

import logging
import sys

from ..pipeline import Pipeline
from .config import ServerConfig
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


def serve(pipeline: Pipeline, config: ServerConfig, *, access_log: bool = True) -> None:
    """Load the models (so a bad --db, --model or --rerank fails here with one clear message),
    then serve until interrupted. ``access_log``: one line per request on stderr."""
    import uvicorn

    from .app import create_app
    from .engine import Engine

    engine = Engine(pipeline, config)
    engine.warm_up()
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can search the collection "
                    "(set --api-key or MMR_API_KEY)", config.host)
    configure_access_log(access_log)
    # uvicorn's own access log is off: ours leaves out query strings and times each request
    uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="info", access_log=False)
