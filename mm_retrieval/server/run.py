"""Start the server in the foreground (what ``mmr serve`` calls)."""

from __future__ import annotations

import logging

from ..pipeline import Pipeline
from .config import ServerConfig

log = logging.getLogger(__name__)


def serve(pipeline: Pipeline, config: ServerConfig) -> None:
    """Load the models (so a bad --db, --model or --rerank fails here with one clear message),
    then serve until interrupted."""
    import uvicorn

    from .app import create_app
    from .engine import Engine

    engine = Engine(pipeline, config)
    engine.warm_up()
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can search the collection "
                    "(set --api-key or MMR_API_KEY)", config.host)
    uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="info", access_log=False)
