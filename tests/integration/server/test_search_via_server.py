"""`mmr search` asks a running `mmr serve` on the same database instead of loading models: found
through the file the server writes beside the collection, ignored when stale; the output is the
one the search gives in process."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from mm_retrieval.server.discovery import Advert, advert_path, advertise
from tests.helpers import free_port


def mmr(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mm_retrieval", *args], capture_output=True, text=True, timeout=timeout, check=False)


def in_process(capsys, *args):
    """`mmr ARGS` in this process: (exit code, stdout, stderr)."""
    from mm_retrieval.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def without_timings(text_or_doc):
    if isinstance(text_or_doc, dict):
        return {k: v for k, v in text_or_doc.items() if k != "timings_ms"}
    return re.sub(r", \d+ ms\)", ", N ms)", text_or_doc)


@pytest.fixture
def demo_db(tmp_path):
    from mm_retrieval.server.testing import make_demo_collection

    return make_demo_collection(tmp_path, reranker=False)


def test_search_goes_through_the_announced_server_with_the_same_output(demo_db, capsys):
    from mm_retrieval.server.app import create_app
    from mm_retrieval.server.background import BackgroundServer
    from mm_retrieval.server.engine import Engine

    pipe = demo_db.pipeline(rerank=False)
    advert = {}
    app = create_app(Engine(pipe), announce=lambda: advertise(advert["it"]))
    searches = [("a red picture", "--k", "3"), ("a blue picture", "--filter", 'path like "%green%"'),
                ("--image", demo_db.paths[2], "--k", "2")]
    path = advert_path(demo_db.db, demo_db.collection)
    server = BackgroundServer(app)  # bound: its url is known before it starts
    advert["it"] = Advert(url=server.url, pid=os.getpid(), db=demo_db.db, collection=demo_db.collection)
    with server:
        assert json.loads(path.read_text())["url"] == server.url
        remote = []
        for args in searches:
            # a child process: Milvus Lite lets one process open the database, and this one holds it,
            # so the child can only answer through the server
            js = mmr("-v", "search", *args, "--db", demo_db.db, "--json")
            assert js.returncode == 0, js.stderr
            assert f"searching through mmr serve at {server.url}" in js.stderr
            human = mmr("search", *args, "--db", demo_db.db)
            assert human.returncode == 0, human.stderr
            remote.append((json.loads(js.stdout), human.stdout))
    assert not path.exists()  # removed when the server stopped
    for args, (doc, human) in zip(searches, remote):
        code, out, err = in_process(capsys, "search", *args, "--db", demo_db.db, "--json")
        assert code == 0, err
        assert without_timings(doc) == without_timings(json.loads(out))
        code, out, err = in_process(capsys, "search", *args, "--db", demo_db.db)
        assert without_timings(human) == without_timings(out) and human.count("\n") >= 4


class Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self):
        Recorder.seen.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    do_POST = do_GET

    def log_message(self, *args):
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("stale", ["process gone", "address silent"])
def test_a_stale_announcement_is_ignored(demo_db, capsys, caplog, stale):
    """A server killed without cleaning up leaves its file: its process is gone (even if something
    else answers at its address now), or its address doesn't answer. The search runs here."""
    answering = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    Recorder.seen = []
    try:
        if stale == "process gone":
            advert = Advert(url=f"http://127.0.0.1:{answering.server_address[1]}", pid=_dead_pid(), db=demo_db.db, collection="images")
        else:
            advert = Advert(url=f"http://127.0.0.1:{free_port()}", pid=os.getpid(), db=demo_db.db, collection="images")
        with advertise(advert):
            caplog.set_level(logging.INFO, logger="mm_retrieval")  # the CLI's log lines, in process
            code, out, err = in_process(capsys, "-v", "search", "a red picture", "--db", demo_db.db, "--json")
            assert code == 0, err
            assert "searching through" not in caplog.text + err
            assert [h["path"] for h in json.loads(out)["hits"]]  # answered here
            assert Recorder.seen == []  # a gone process's address is never asked
    finally:
        answering.shutdown()


def test_server_flag_with_a_model_of_its_own_is_refused(demo_db, capsys):
    code, _, err = in_process(capsys, "search", "x", "--server", "http://127.0.0.1:9", "--model", "mmr-tiny", "--db", demo_db.db)
    assert code == 2 and "--server searches with the server's models" in err and "--model" in err


@pytest.mark.slow  # `mmr serve` as a process (a model load) and a demo collection built in a child
def test_mmr_serve_announces_itself_and_cleans_up(tmp_path):
    code = "import sys; from mm_retrieval.server.testing import make_demo_collection; make_demo_collection(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    db = str(tmp_path / "mmr.db")
    path = advert_path(db, "images")
    proc = subprocess.Popen([sys.executable, "-m", "mm_retrieval", "serve", "--db", db, "--port", "0", "--rerank", str(tmp_path / "reranker")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not path.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mmr serve never announced itself"
            time.sleep(0.2)
        advert = json.loads(path.read_text())
        assert advert["pid"] == proc.pid and re.fullmatch(r"http://127\.0\.0\.1:\d+", advert["url"]) and not advert["url"].endswith(":0")
        assert advert["reranker"] == str((tmp_path / "reranker").resolve())
        reranked = mmr("-v", "search", "a red picture", "--db", db, "--rerank", str(tmp_path / "reranker"), "--json")
        assert reranked.returncode == 0 and "searching through mmr serve" in reranked.stderr, reranked.stderr
        assert json.loads(reranked.stdout)["reranked"] is True
        plain = mmr("search", "a red picture", "--db", db, "--json")
        assert plain.returncode == 0 and json.loads(plain.stdout)["reranked"] is False, plain.stderr  # as without a server
        # `mmr explain` and `mmr eval` too (tests/integration/server/test_eval_explain_via_server.py compares their output)
        image = str(sorted((tmp_path / "images").glob("*.png"))[0])
        explained = mmr("-v", "explain", "a red picture", image, "--db", db, "-o", str(tmp_path / "e.png"), "--json")
        assert explained.returncode == 0 and "explaining through mmr serve" in explained.stderr, explained.stderr
        assert json.loads(explained.stdout)["id"] is not None  # no --rerank: the server's reranker explains
        (tmp_path / "captions.csv").write_text(f"path,caption\n{image},a picture\n")
        evaluated = mmr("-v", "eval", str(tmp_path / "captions.csv"), "--db", db, "--rerank", str(tmp_path / "reranker"), "--json")
        assert evaluated.returncode == 0 and "evaluating through mmr serve" in evaluated.stderr, evaluated.stderr
        assert json.loads(evaluated.stdout)["reranked"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert not path.exists(), out  # removed on a graceful exit
    here = mmr("search", "a red picture", "--db", db, "--rerank", str(tmp_path / "reranker"), "--json")
    assert here.returncode == 0, here.stderr
    assert without_timings(json.loads(here.stdout)) == without_timings(json.loads(reranked.stdout))
