"""`mmr eval` and `mmr explain` ask a running `mmr serve` on the same database instead of loading
models (as `mmr search` does: tests/integration/server/test_search_via_server.py): found through the file
the server writes beside the collection, ignored when stale; the output is the one the command
gives in process."""

import json
import logging
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from mm_retrieval.server.discovery import Advert, advertise, resolved_ref
from mm_retrieval.testing.images import make_image
from tests.integration.server.test_search_via_server import _dead_pid, in_process, mmr


@pytest.fixture
def demo(tmp_path):
    from mm_retrieval.server.testing import make_demo_collection

    demo = make_demo_collection(tmp_path)  # 8 coloured images and a small reranker
    table = tmp_path / "captions.csv"
    table.write_text("path,caption\n" + "".join(f"{p},a {os.path.basename(p)[:-4]} picture\n" for p in demo.paths))
    return demo, table


def without_seconds(doc):
    return {k: v for k, v in doc.items() if k not in ("seconds", "png")}


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_eval_and_explain_go_through_the_announced_server_with_the_same_output(demo, tmp_path, capsys, caplog):
    from mm_retrieval.server.app import create_app
    from mm_retrieval.server.background import BackgroundServer
    from mm_retrieval.server.engine import Engine

    demo, table = demo
    ck = str(demo.checkpoint)
    common = ("--db", demo.db, "--rerank", ck)
    unindexed = make_image(tmp_path / "new.png", (40, 200, 90), seed=7)
    extra = tmp_path / "more.csv"  # a caption whose image the collection lacks
    extra.write_text(table.read_text() + f"{unindexed},a new picture\n")
    advert = {}
    server = BackgroundServer(create_app(Engine(demo.pipeline(rerank=True)), announce=lambda: advertise(advert["it"])))
    advert["it"] = Advert(url=server.url, pid=os.getpid(), db=demo.db, collection=demo.collection, reranker=resolved_ref(ck))
    explains = {"file": demo.paths[0], "unindexed": str(unindexed)}
    with server:
        # children: Milvus Lite lets one process open the database, and this one holds it
        ev = mmr("-v", "eval", str(table), *common, "--json")
        assert ev.returncode == 0, ev.stderr
        assert f"evaluating through mmr serve at {server.url}" in ev.stderr
        remote_eval = json.loads(ev.stdout)
        # the rest in this process (faster; its log says the server answered)
        caplog.set_level(logging.INFO, logger="mm_retrieval")
        code, human, err = in_process(capsys, "eval", str(table), *common, "--mode", "image")
        assert code == 0 and "reranked" in human and f"evaluating through mmr serve at {server.url}" in caplog.text, err
        code, _, err = in_process(capsys, "eval", str(extra), *common)
        assert code != 0 and "1 of the 9 images to evaluate are not in collection 'images'" in err and "--no-index" in err, err
        code, partial, err = in_process(capsys, "eval", str(extra), *common, "--no-index", "--json")
        assert code == 0, err
        remote_explain = {}
        for name, ref in explains.items():
            run = mmr("-v", "explain", "a red picture", ref, *common, "-o", str(tmp_path / f"remote-{name}.png"),
                      "--head", "1", "--layer", "0", "--json")
            assert run.returncode == 0, run.stderr
            assert f"explaining through mmr serve at {server.url}" in run.stderr
            remote_explain[name] = json.loads(run.stdout)
        code, by_id, err = in_process(capsys, "explain", "a red picture", remote_explain["file"]["id"], *common,
                                      "-o", str(tmp_path / "remote-id.png"))
        assert code == 0 and "reranker " in by_id and f"explaining through mmr serve at {server.url}" in caplog.text, err
        code, _, err = in_process(capsys, "explain", "a red picture", "f" * 32, *common)
        assert code != 0 and "no item" in err, err
        code, _, err = in_process(capsys, "explain", "a red picture", demo.paths[0], *common, "--layer", "5")
        assert code != 0 and "--layer 5: the reranker has 2 layers (0..1)" in err, err
        # what the API refuses, said in its words
        both = httpx.post(f"{server.url}/explain", json={"query": "red", "id": remote_explain["file"]["id"], "path": demo.paths[0]})
        assert both.status_code == 422 and "exactly one of id, path and image (got id, path)" in both.text
        not_an_id = httpx.post(f"{server.url}/eval", json={"queries": [{"text": "red", "relevant": ["../x"]}]})
        assert not_an_id.status_code == 422 and "relevant" in not_an_id.text
    # the same commands in process (the server gone: they load the models)
    code, out, err = in_process(capsys, "eval", str(table), *common, "--no-index", "--json")
    assert code == 0, err
    assert without_seconds(remote_eval) == without_seconds(json.loads(out))
    code, out, err = in_process(capsys, "eval", str(table), *common, "--mode", "image", "--no-index")
    assert code == 0 and out.splitlines()[1:] == human.splitlines()[1:], err
    assert remote_eval["reranked"] is not None and remote_eval["n_queries"] == 8
    code, out, err = in_process(capsys, "eval", str(extra), *common, "--no-index", "--json")
    assert code == 0 and without_seconds(json.loads(partial)) == without_seconds(json.loads(out)), err
    for name, ref in explains.items():
        png = tmp_path / f"local-{name}.png"
        code, out, err = in_process(capsys, "explain", "a red picture", ref, *common, "-o", str(png), "--head", "1", "--layer", "0", "--json")
        assert code == 0, err
        assert without_seconds(remote_explain[name]) == without_seconds(json.loads(out))
        assert np.array_equal(pixels(png), pixels(tmp_path / f"remote-{name}.png"))
    assert len(remote_explain["file"]["id"]) == 32 and remote_explain["unindexed"]["id"] is None
    code, out, err = in_process(capsys, "explain", "a red picture", remote_explain["file"]["id"], *common, "-o", str(tmp_path / "local-id.png"))
    assert code == 0 and out == by_id.replace("remote-id", "local-id"), err
    assert np.array_equal(pixels(tmp_path / "local-id.png"), pixels(tmp_path / "remote-id.png"))


@pytest.mark.parametrize("command", ["eval", "explain"])
def test_a_stale_announcement_is_ignored(demo, capsys, caplog, tmp_path, command):
    """A server killed without cleaning up leaves its file; the command runs here."""
    demo, table = demo
    advert = Advert(url="http://127.0.0.1:9", pid=_dead_pid(), db=demo.db, collection="images", reranker=resolved_ref(str(demo.checkpoint)))
    args = (["eval", str(table), "--no-index"] if command == "eval"
            else ["explain", "a red picture", demo.paths[1], "-o", str(tmp_path / "e.png")])
    caplog.set_level(logging.INFO, logger="mm_retrieval")
    with advertise(advert):
        code, out, err = in_process(capsys, *args, "--db", demo.db, "--rerank", str(demo.checkpoint), "--json")
    assert code == 0, err
    assert "process" in caplog.text and "is gone" in caplog.text and "through mmr serve" not in caplog.text
    assert json.loads(out)["reranked" if command == "eval" else "score"] is not None


def test_server_flag_with_a_model_of_its_own_is_refused(demo, capsys):
    demo, table = demo
    code, _, err = in_process(capsys, "eval", str(table), "--server", "http://127.0.0.1:9", "--device", "cpu", "--db", demo.db)
    assert code == 2 and "--server evaluates with the server's models" in err and "--device" in err
