"""Run the server under a real uvicorn in a background thread: for tests, examples and notebooks.

    with BackgroundServer(create_app(Engine(pipeline))) as server:
        requests.post(f"{server.url}/v1/rerank", json={...})
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

log = logging.getLogger(__name__)


class BackgroundServer:
    """A uvicorn server on ``host`` (loopback by default) and a free port, in a daemon thread.
    :meth:`start` returns once the app's startup (model loading) has finished."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._run, name=f"mmr-serve-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} failed to start (see the log above){': ' + str(self._error) if self._error else ''}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server on {self.url} did not start within {timeout:.0f}s")
            time.sleep(0.02)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start()
            self._error = e

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
