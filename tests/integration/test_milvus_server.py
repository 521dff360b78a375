"""The server code path: the same store code against `milvus-lite server` on 127.0.0.1."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import COLORS, TINY
from mm_retrieval import Pipeline
from mm_retrieval.errors import StoreError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
    port = _free_port()
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


def test_index_and_search_over_grpc(milvus_server, image_folder):
    pipe = Pipeline(db=milvus_server, collection="server_test", encoder={**TINY, "workers": 0})
    report = pipe.index(image_folder, progress=False)
    assert report.indexed == len(COLORS)
    assert pipe.index(image_folder, progress=False).indexed == 0  # idempotent over the server too
    res = pipe.search("a green picture", k=3, filter='path like "%nested%"')
    assert res.hits and all("nested" in h.path for h in res.hits)
    # the same results as an embedded database with the same model and images
    local = Pipeline(db=str(image_folder.parent / "local.db"), encoder={**TINY, "workers": 0})
    local.index(image_folder, progress=False)
    ref = local.search("a green picture", k=3, filter='path like "%nested%"')
    assert [h.id for h in res.hits] == [h.id for h in ref.hits]


def test_unreachable_server_is_a_retriable_store_error():
    port = _free_port()  # nothing listens here
    pipe = Pipeline(db=f"http://127.0.0.1:{port}", store={"timeout": 2.0}, encoder={**TINY, "workers": 0})
    with pytest.raises(StoreError) as e:
        pipe.search("anything")
    assert e.value.retriable and f"127.0.0.1:{port}" in str(e.value)
