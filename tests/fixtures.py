"""Fixtures shared by every test path: tests/conftest.py and each plugins/*/tests/conftest.py
take them with a star import (the repository's top level holds no conftest). Plain helpers live
in tests/helpers.py. Tests never reach the network: the model hub is forced offline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# token caches of server collections go under MMR_CACHE_DIR (else ~/.cache): keep tests' apart
os.environ["MMR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmr-test-cache-")
# Fixtures import mm_retrieval (and tests.helpers, which does) only when used: a package that
# fails to import fails the tests that need it, not the collection of every test.


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A bench or extended test is slow too, so `-m "not slow"` leaves it out as well."""
    for item in items:
        if (item.get_closest_marker("bench") or item.get_closest_marker("extended")) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """8 distinct images in a folder tree (one nested), plus nothing else."""
    from tests.helpers import COLORS, make_image

    root = tmp_path / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        sub = root / "nested" if i % 3 == 0 else root
        make_image(sub / f"{name}.png", rgb, seed=i)
    return root


@pytest.fixture
def tiny_pipeline(tmp_path: Path):
    """A pipeline on a fresh Milvus Lite db with the tiny seeded model (no decoding workers)."""
    from mm_retrieval import Pipeline
    from tests.helpers import TINY

    return Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})


# ---- `mmr serve` on the demo collection ------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo collection (:func:`mm_retrieval.server.testing.make_demo_collection`): 8 images
    indexed with ``mmr-tiny`` and a reranker that reorders them. A module overrides this fixture
    to serve another collection."""
    from mm_retrieval.server.testing import make_demo_collection

    return make_demo_collection(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def server_config():
    """The ``ServerConfig`` that ``served`` starts with (None: the defaults, no API key). A module
    overrides this fixture to set a key or limits."""
    return None


@pytest.fixture(scope="module")
def served(demo, server_config):
    """``mmr serve`` (a real uvicorn on 127.0.0.1) on ``demo`` with ``server_config``; yields
    ``(server, demo)``."""
    from mm_retrieval.server.testing import serve_demo

    with serve_demo(None, server_config, demo=demo) as (server, demo):
        yield server, demo


# ---- a real Milvus server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A real `milvus-lite server` on 127.0.0.1 (the server code path); yields its URI."""
    from tests.helpers import free_port

    exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
    port = free_port()
    data = tmp_path_factory.mktemp("milvus-data")
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"milvus-lite server exited: {(data / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("milvus-lite server did not start in 60 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
