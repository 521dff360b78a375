"""Shared fixtures. Tests never reach the network: the model hub is forced offline."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# token caches of server collections go under MMR_CACHE_DIR (else ~/.cache): keep tests' apart
import tempfile

os.environ["MMR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmr-test-cache-")

TINY = {"model": "mmr-tiny", "pretrained": "none"}


def make_image(path: Path, color: tuple[int, int, int], size=(72, 56), seed: int = 0, fmt: str | None = None) -> Path:
    """A small distinct image: a solid colour with a few seeded noise pixels (unique bytes)."""
    from PIL import Image

    rng = random.Random(seed)
    im = Image.new("RGB", size, color)
    px = im.load()
    for _ in range(12):
        px[rng.randrange(size[0]), rng.randrange(size[1])] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """8 distinct images in a folder tree (one nested), plus nothing else."""
    root = tmp_path / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        sub = root / "nested" if i % 3 == 0 else root
        make_image(sub / f"{name}.png", rgb, seed=i)
    return root


@pytest.fixture
def tiny_pipeline(tmp_path: Path):
    """A pipeline on a fresh Milvus Lite db with the tiny seeded model (no decoding workers)."""
    from mm_retrieval import Pipeline

    return Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """A real `milvus-lite server` on 127.0.0.1 (the server code path); yields its URI."""
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
