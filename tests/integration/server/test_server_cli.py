"""`mmr serve` as users start it: a separate process on 127.0.0.1, the key from $MMR_API_KEY,
a rerank as its very first request, and a clean exit on SIGTERM."""

import base64
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # built in a child: Milvus Lite lets one process at a time open the database, and the server needs it
    code = "import sys; from mm_retrieval.server.testing import make_demo_collection; make_demo_collection(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, capture_output=True)
    return root


@pytest.mark.slow  # a demo collection built in a child, then `mmr serve` as a process
def test_mmr_serve_process(demo_root):
    port = free_port()
    env = {**os.environ, "MMR_API_KEY": "cli-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mm_retrieval", "serve", "--db", str(demo_root / "mmr.db"), "--rerank", str(demo_root / "reranker"),
         "--port", str(port), "--max-documents", "50", "--max-image-mb", "0.01", "--media-root", str(demo_root / "images")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mmr serve did not become ready"
            time.sleep(0.2)
        docs = [str(demo_root / "images" / f"{c}.png") for c in ("red", "green", "blue")]
        first = httpx.post(f"{url}/v2/rerank", json={"model": "m", "query": "a red picture", "documents": docs},
                           headers={"Authorization": "Bearer cli-key"}, timeout=60)
        assert first.status_code == 200, first.text  # the first request of a fresh process: collection loaded on demand
        assert sorted(r["index"] for r in first.json()["results"]) == [0, 1, 2]
        assert httpx.post(f"{url}/v2/rerank", json={"model": "m", "query": "q", "documents": docs}, timeout=60).status_code == 401
        too_many = httpx.post(f"{url}/rerank", json={"query": "q", "texts": docs * 17}, headers={"X-API-Key": "cli-key"}, timeout=60)
        assert too_many.status_code == 413 and "the limit is 50" in too_many.json()["error"]
        # the search page ships as package data; an image query over --max-image-mb is a 413
        page = httpx.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and "static/app.js" in page.text
        big = base64.b64encode(os.urandom(12 * 1024)).decode()
        over = httpx.post(f"{url}/search", json={"image": big}, headers={"X-API-Key": "cli-key"}, timeout=60)
        assert over.status_code == 413 and "10,485-byte limit" in over.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out


def test_mmr_serve_refuses_a_missing_collection_with_one_line(tmp_path, capsys):
    from mm_retrieval.cli import main

    assert main(["serve", "--db", str(tmp_path / "none.db"), "--port", str(free_port())]) == 2  # before any port is bound
    err = capsys.readouterr().err
    assert "does not exist" in err and "mmr index" in err
