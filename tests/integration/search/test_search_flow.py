"""One search flow (mm_retrieval.search) on its three paths -- the Python API, the CLI and HTTP:
image queries in auto mode find the image itself (issue 18), an explicit rerank request that
can't be honoured is an error naming why, the query is encoded once, and paging."""

import base64
import json

import httpx
import pandas as pd
import pytest

from mm_retrieval import Pipeline
from mm_retrieval.cli import main
from mm_retrieval.errors import InputError
from mm_retrieval.query import Query
from mm_retrieval.server.testing import TINY_ENCODER, save_demo_reranker
from tests.helpers import COLORS, make_image


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A table of captioned images (so the collection holds text vectors) plus a text-only row,
    a reranker for its encoder, and two servers on it: with and without the reranker."""
    from mm_retrieval.server.app import create_app
    from mm_retrieval.server.background import BackgroundServer
    from mm_retrieval.server.engine import Engine

    root = tmp_path_factory.mktemp("captioned")
    rows = [{"path": str(make_image(root / "img" / f"{name}.png", rgb, seed=i)), "caption": f"a {name} picture"}
            for i, (name, rgb) in enumerate(COLORS.items())]
    rows.append({"path": None, "caption": "a recipe for red soup"})
    pd.DataFrame(rows).to_csv(root / "items.csv", index=False)
    db = str(root / "mmr.db")
    indexer = Pipeline(db=db, encoder=TINY_ENCODER)
    assert indexer.index(root / "items.csv", progress=False).indexed == len(rows)
    ckpt = save_demo_reranker(indexer, root / "reranker")
    indexer.close()

    def pipe(rerank=True):
        return Pipeline(db=db, encoder={"workers": 0}, reranker=str(ckpt) if rerank else None)

    engine = Engine(pipe())
    with BackgroundServer(create_app(engine)) as with_rr, BackgroundServer(create_app(Engine(pipe(False)))) as without:
        yield {"db": db, "ckpt": str(ckpt), "paths": [r["path"] for r in rows[:-1]], "pipe": pipe, "engine": engine,
               "url": with_rr.url, "url_no_reranker": without.url}


# Pipelines here are never closed: closing one releases the process's Milvus Lite server, which
# the servers' engines share.


def _post(url, **body):
    return httpx.post(f"{url}/search", json=body, timeout=60)


def _cli(capsys, *args):
    code = main(["search", *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


# ---- issue 18: an image query in auto mode means similar images --------------------------------
def test_an_indexed_image_finds_itself_first_on_every_path(captioned, capsys):
    probe = captioned["paths"][3]
    pipe = captioned["pipe"]()
    assert pipe.search("a yellow picture", k=3).mode == "hybrid"  # text queries: auto is still hybrid here

    by_file = pipe.search(image=probe, k=3)  # auto
    assert by_file.mode == "image" and not by_file.reranked
    assert by_file.hits[0].path == probe and by_file.hits[0].score == pytest.approx(1.0, abs=1e-4)
    item = by_file.hits[0].id
    for res in (pipe.search(image=open(probe, "rb").read(), k=3), pipe.search(image_id=item, k=3)):
        assert res.mode == "image" and res.hits[0].id == item and res.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.id for h in res.hits] == [h.id for h in by_file.hits]

    code, doc, err = _cli(capsys, "--image", probe, "--db", captioned["db"], "--k", "3")
    assert code == 0, err
    assert doc["mode"] == "image" and doc["hits"][0]["path"] == probe and doc["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    data = base64.b64encode(open(probe, "rb").read()).decode()
    for body in ({"image": data}, {"image_id": item}):
        got = _post(captioned["url"], k=3, **body)
        assert got.status_code == 200, got.text
        got = got.json()
        assert got["mode"] == "image" and got["reranked"] is False
        assert got["hits"][0]["id"] == item and got["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # image -> text and both fused remain, when asked for
    assert all(h.caption for h in captioned["pipe"]().search(image=probe, mode="text", k=3).hits)
    assert _post(captioned["url"], image_id=item, mode="hybrid", k=3).json()["mode"] == "hybrid"


# ---- an explicit rerank request that can't be honoured ------------------------------------------
CANNOT = [
    # (what, library kwargs, HTTP body, what the message names)
    ("image query", {"image_id": None}, {"image_id": None}, "image queries are not reranked"),
    ("text mode", {"query": "a red picture", "mode": "text"}, {"query": "a red picture", "mode": "text"}, "--mode text is not reranked"),
]


@pytest.mark.parametrize("what,kwargs,body,mention", CANNOT, ids=[c[0] for c in CANNOT])
def test_rerank_that_cannot_apply_is_an_error_on_every_path(captioned, capsys, what, kwargs, body, mention):
    pipe = captioned["pipe"]()
    item = pipe.search(image=captioned["paths"][0], k=1).hits[0].id
    kwargs = {k: (item if v is None else v) for k, v in kwargs.items()}
    body = {k: (item if v is None else v) for k, v in body.items()}
    with pytest.raises(InputError, match=mention):
        pipe.search(**kwargs, rerank=True)
    assert not pipe.search(**kwargs).reranked  # the default: rerank where it applies

    res = _post(captioned["url"], **body, rerank=True)
    assert res.status_code == 422 and mention in res.json()["detail"]
    ok = _post(captioned["url"], **body)
    assert ok.status_code == 200 and ok.json()["reranked"] is False

    args = ["a red picture", "--mode", "text"] if what == "text mode" else ["--image", captioned["paths"][0]]
    code, _, err = _cli(capsys, *args, "--db", captioned["db"], "--rerank", captioned["ckpt"])
    assert code == 2 and mention in err and "Traceback" not in err


def test_rerank_without_a_reranker_is_an_error_on_every_path(captioned, capsys):
    pipe = captioned["pipe"](rerank=False)
    with pytest.raises(InputError, match="no reranker is configured"):
        pipe.search("a red picture", rerank=True)
    assert not pipe.search("a red picture").reranked
    res = _post(captioned["url_no_reranker"], query="a red picture", rerank=True)
    assert res.status_code == 422 and "no reranker is configured" in res.json()["detail"]
    assert _post(captioned["url_no_reranker"], query="a red picture").json()["reranked"] is False
    # the CLI has no way to ask without naming a reranker; a config naming none and --rerank DIR reranks
    code, doc, err = _cli(capsys, "a red picture", "--mode", "image", "--db", captioned["db"], "--rerank", captioned["ckpt"])
    assert code == 0 and doc["reranked"] is True, err


# ---- the query is encoded once --------------------------------------------------------------
class _Recorded:
    """Wraps a stage method: records each call's first argument, then calls it."""

    def __init__(self, fn):
        self.fn, self.args = fn, []

    def __call__(self, *args, **kwargs):
        self.args.append(args[0])
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("mode", ["image", "hybrid"])
def test_a_reranked_search_encodes_the_query_once(captioned, monkeypatch, mode):
    pipe = captioned["pipe"]()
    pipe.search("warm up", k=1)  # load the models and the reranker's memory outside the counts
    encoder, reranker = pipe.encoder, pipe.reranker
    monkeypatch.setattr(reranker, "score", _Recorded(reranker.score))
    forwards = {name: _Recorded(getattr(encoder, name)) for name in ("encode_text", "encode_text_tokens")}
    for name, rec in forwards.items():
        monkeypatch.setattr(encoder, name, rec)

    res = pipe.search("a red picture", mode=mode, k=3)
    assert res.reranked
    (query,) = reranker.score.args
    assert isinstance(query, Query) and query.text == "a red picture" and query.encodes == 1
    assert sum(len(rec.args) for rec in forwards.values()) == 1  # one text-tower forward in all


@pytest.mark.parametrize("mode", ["image", "hybrid"])
def test_a_reranked_search_over_http_encodes_the_query_once(captioned, monkeypatch, mode):
    encoder = captioned["engine"].pipeline.encoder  # the server's, called on its device thread
    assert _post(captioned["url"], query="warm up", k=1).json()["reranked"]
    forwards = {name: _Recorded(getattr(encoder, name)) for name in ("encode_text", "encode_text_tokens")}
    for name, rec in forwards.items():
        monkeypatch.setattr(encoder, name, rec)
    res = _post(captioned["url"], query="a red picture", mode=mode, k=3).json()
    assert res["reranked"] and res["mode"] == mode
    assert sum(len(rec.args) for rec in forwards.values()) == 1  # the embedding job's forward, reused by the rerank job


def test_eval_encodes_captions_in_batches_once_each(captioned, monkeypatch):
    from mm_retrieval.evaluation import evaluate

    pipe = captioned["pipe"]()
    pipe.search("warm up", k=1)
    encoder, reranker = pipe.encoder, pipe.reranker
    monkeypatch.setattr(reranker, "score", _Recorded(reranker.score))
    forwards = {name: _Recorded(getattr(encoder, name)) for name in ("encode_text", "encode_text_tokens")}
    for name, rec in forwards.items():
        monkeypatch.setattr(encoder, name, rec)
    table = captioned["paths"][0].rsplit("/img/", 1)[0] + "/items.csv"
    doc = evaluate(pipe, table, candidates=5, index=False, batch=4)
    n = doc["n_queries"]
    assert n == len(COLORS) and doc["reranked"] is not None  # the text-only row has no image to find
    assert sum(len(rec.args) for rec in forwards.values()) == -(-n // 4)  # one forward per batch of 4
    assert len(reranker.score.args) == n and all(q.encodes == 1 for q in reranker.score.args)
    with pytest.raises(InputError, match="--mode text is not reranked"):
        evaluate(pipe, table, index=False, mode="text", rerank=True)
    assert evaluate(pipe, table, index=False, mode="text")["reranked"] is None


# ---- paging and timings ---------------------------------------------------------------------
@pytest.mark.parametrize("rerank", [True, False])
def test_offset_pages_through_the_same_ranking(captioned, rerank):
    pipe = captioned["pipe"]()
    whole = pipe.search("a red picture", mode="image", k=8, candidates=8, rerank=rerank)
    pages = [pipe.search("a red picture", mode="image", k=3, offset=o, candidates=8, rerank=rerank) for o in (0, 3, 6)]
    assert [h.id for p in pages for h in p.hits] == [h.id for h in whole.hits]
    assert [h.rank for h in pages[1].hits] == [4, 5, 6]
    assert set(whole.timings_ms) == {"encode", "search", "rerank", "total"}
    assert whole.timings_ms["total"] == pytest.approx(sum(whole.timings_ms[s] for s in ("encode", "search", "rerank")))
    with pytest.raises(InputError, match="k \\+ offset"):
        pipe.search("a red picture", k=16000, offset=1000)
