"""``mmr serve``: search and reranking over HTTP, in the wire formats existing stacks speak.

* :class:`~mm_retrieval.server.engine.Engine` -- the pipeline, its reranker and the batcher;
* :func:`~mm_retrieval.server.app.create_app` -- the FastAPI app (routes, auth, limits, errors);
* :mod:`~mm_retrieval.server.formats` -- Cohere v2, TEI, vLLM/Jina and the native ``/search``;
* :class:`~mm_retrieval.server.background.BackgroundServer` -- uvicorn in a thread (tests, examples).

Needs ``fastapi`` and ``uvicorn`` (dependencies of mm-retrieval).
"""

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "Engine", "BackgroundServer", "serve"]


def __getattr__(name: str):
    # Lazy: `import mm_retrieval.server` for the config alone must not import torch or FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "BackgroundServer":
        from .background import BackgroundServer

        return BackgroundServer
    if name == "serve":
        from .run import serve

        return serve
    raise AttributeError(name)
