"""`mmr serve` over real HTTP: every endpoint's shape, agreement with `mmr search --rerank`,
documents by path / id / inline image, limits, auth, and errors that change nothing."""

import base64
import io
import json

import httpx
import numpy as np
import pytest

from mm_retrieval.backfill import cache_info
from mm_retrieval.server import ServerConfig
from mm_retrieval.server.testing import make_image

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = ServerConfig(api_key=KEY, max_documents=16, max_body_bytes=256 * 1024, max_image_bytes=64 * 1024)
QUERY = "a red picture"


@pytest.fixture(scope="module")
def server_config():
    return CONFIG


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(served):
    """The same collection and reranker through the Python API: what `mmr search` computes."""
    pipe = served[1].pipeline()
    pipe.search(QUERY, k=8, candidates=8)  # derives every item's reranker memory once, up front
    return pipe


def _expected(reference, query=QUERY):
    """`mmr search --rerank` over the whole (8-image) collection: path -> score, in order."""
    hits = reference.search(query, k=8, candidates=8).hits
    return [h.path for h in hits], {h.path: h.score for h in hits}


def _png(color, seed=99, size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(make_image(_png.tmp / f"{seed}.png", color, seed=seed, size=size)).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module", autouse=True)
def _png_dir(tmp_path_factory):
    _png.tmp = tmp_path_factory.mktemp("inline")


def _state(reference):
    return reference.store.count(), [(c["fingerprint"], c["items"]) for c in cache_info(reference.store)]


# ---- health ---------------------------------------------------------------------------------
def test_health_and_readiness_need_no_key(served):
    server, _ = served
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    doc = ready.json()
    assert doc["ready"] is True and doc["reranker"] is True and doc["collection"] == "images"
    assert doc["model"] == "mmr/reranker" and "batching" in doc


# ---- /search --------------------------------------------------------------------------------
def test_search_is_the_mmr_search_json_document(client, reference, capsys, served):
    from mm_retrieval.cli import main

    demo = served[1]
    body = client.post("/search", json={"query": QUERY, "k": 5, "candidates": 8}).json()
    assert main(["search", QUERY, "--db", demo.db, "--rerank", str(demo.checkpoint), "--k", "5", "--candidates", "8", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert set(body) == set(cli) and set(body["hits"][0]) == set(cli["hits"][0])
    assert body["reranked"] is True and set(body["timings_ms"]) == {"encode", "search", "rerank", "total"}
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in cli["hits"]]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    for got, want in zip(body["hits"], cli["hits"]):
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert got["retrieval_score"] == want["retrieval_score"]  # the same Milvus search
        assert got["path"] == want["path"] and got["metadata"] == want["metadata"]


def test_search_first_stage_and_filter(client, reference):
    first = client.post("/search", json={"query": QUERY, "k": 3, "rerank": False}).json()
    want = reference.search(QUERY, k=3, rerank=False)
    assert first["reranked"] is False
    assert [h["id"] for h in first["hits"]] == [h.id for h in want.hits]
    assert all(h["score"] == h["retrieval_score"] for h in first["hits"])
    only_red = client.post("/search", json={"query": QUERY, "filter": 'path like "%red.png"'}).json()
    assert [h["path"].rsplit("/", 1)[-1] for h in only_red["hits"]] == ["red.png"]


# ---- rerank endpoints -----------------------------------------------------------------------
def test_every_rerank_format_orders_like_mmr_search_rerank(client, reference, served):
    demo = served[1]
    order, score = _expected(reference)
    docs = list(reversed(demo.paths))  # any order in: the ranking must not depend on it

    cohere = client.post("/v2/rerank", json={"model": "rerank-v3.5", "query": QUERY, "documents": docs}).json()
    assert set(cohere) == {"id", "results", "meta"} and cohere["meta"] == {"api_version": {"version": "2"}}
    assert all(set(r) == {"index", "relevance_score"} for r in cohere["results"])
    assert [docs[r["index"]] for r in cohere["results"]] == order

    tei = client.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": False}).json()
    assert isinstance(tei, list) and all(set(r) == {"index", "score"} for r in tei)  # no text unless asked
    assert sorted(r["index"] for r in tei) == list(range(len(docs)))  # every text, best first
    assert [docs[r["index"]] for r in tei] == order

    for path in ("/v1/rerank", "/rerank"):  # /rerank with `documents` is vLLM's (Milvus' vllm provider posts there)
        v = client.post(path, json={"model": "whatever", "query": QUERY, "documents": docs}).json()
        assert set(v) == {"id", "model", "usage", "results"} and v["model"] == "mmr/reranker"
        assert set(v["usage"]) == {"prompt_tokens", "total_tokens"} and v["usage"]["prompt_tokens"] > 0
        assert [r["document"] for r in v["results"]] == [{"text": p, "multi_modal": None} for p in order]

    for r in cohere["results"]:  # the relevance score is the reranker's logit: mmr search's score
        assert r["relevance_score"] == pytest.approx(score[docs[r["index"]]], abs=1e-4)
    for r in tei:
        assert r["score"] == pytest.approx(score[docs[r["index"]]], abs=1e-4)


def test_top_n_and_return_text(client, reference, served):
    demo = served[1]
    order, _ = _expected(reference)
    cohere = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": demo.paths, "top_n": 3}).json()
    assert [demo.paths[r["index"]] for r in cohere["results"]] == order[:3]
    v = client.post("/v1/rerank", json={"query": QUERY, "documents": demo.paths, "top_n": 2}).json()
    assert [r["document"]["text"] for r in v["results"]] == order[:2]
    assert len(client.post("/v1/rerank", json={"query": QUERY, "documents": demo.paths, "top_n": 0}).json()["results"]) == 8
    tei = client.post("/rerank", json={"query": QUERY, "texts": demo.paths[:2], "return_text": True}).json()
    assert all(r["text"] == demo.paths[:2][r["index"]] for r in tei)


def test_documents_by_id_and_inline_score_like_their_reference(client, reference, served):
    demo = served[1]
    before = _state(reference)
    ids = {h.path: h.id for h in reference.search(QUERY, k=8, rerank=False).hits}
    red, blue = demo.paths[0], demo.paths[2]
    with open(red, "rb") as f:
        red_bytes = f.read()
    new = _png((10, 200, 200), seed=7)  # a cyan image the collection has never seen
    docs = [red, ids[blue], _data_uri(red_bytes), base64.b64encode(red_bytes).decode(), _data_uri(new)]
    res = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": docs})
    assert res.status_code == 200, res.text
    got = {r["index"]: r["relevance_score"] for r in res.json()["results"]}
    _, score = _expected(reference)
    assert got[0] == pytest.approx(score[red], abs=1e-4)
    assert got[1] == pytest.approx(score[blue], abs=1e-4)  # by id
    assert got[2] == pytest.approx(got[0], abs=1e-4) and got[3] == pytest.approx(got[0], abs=1e-4)  # inline copies
    assert np.isfinite(got[4])

    part = {"content": [{"type": "image_url", "image_url": {"url": _data_uri(new)}}]}
    v = client.post("/v1/rerank", json={"query": QUERY, "documents": [part, red, {"content": [{"type": "text", "text": red}]}]})
    assert v.status_code == 200, v.text
    by_index = {r["index"]: r for r in v.json()["results"]}
    assert by_index[0]["relevance_score"] == pytest.approx(got[4], abs=1e-4)
    assert by_index[0]["document"] == {"text": None, "multi_modal": part["content"]}
    assert by_index[2]["relevance_score"] == pytest.approx(by_index[1]["relevance_score"], abs=1e-6)
    assert _state(reference) == before  # inline images are never indexed or cached


# ---- errors ---------------------------------------------------------------------------------
BAD = [
    # (path, body or raw bytes, status, what the message must mention)
    ("/v2/rerank", b'{"model": "m", "query": ', 400, "malformed JSON"),
    ("/rerank", b"[1, 2", 400, "malformed JSON"),
    ("/v1/rerank", b"not json", 400, "malformed JSON"),
    ("/search", b"{", 400, "malformed JSON"),
    ("/v2/rerank", {"query": "q", "documents": ["a"]}, 400, "model"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": "a"}, 400, "documents"),
    ("/v2/rerank", {"model": "m", "query": 3, "documents": ["a"]}, 400, "query"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("/rerank", {"query": "q", "texts": [1, 2]}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ("/rerank", {"query": "q", "texts": []}, 400, "no documents"),
    ("/rerank", {"query": "   ", "texts": ["a"]}, 422, "query is empty"),
    ("/rerank", {"query": "q\u0000", "texts": ["a"]}, 422, "NUL"),
    ("/rerank", {"query": "q" * 3000, "texts": ["a"]}, 413, "2,000"),
    ("/rerank", {"query": "q", "texts": ["x.png"] * 17}, 413, "the limit is 16"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["x.png"] * 17}, 400, "the limit is 16"),
    ("/v1/rerank", {"query": "q", "documents": {"content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}},
     400, "does not fetch"),
    ("/v1/rerank", {"query": "q", "documents": [{"content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}, 400, "documents"),
    ("/v1/rerank", {"query": "q", "documents": [{"content": []}]}, 400, "exactly one part"),
    ("/v1/rerank", {"query": {"content": []}, "documents": ["a"]}, 400, "query"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["data:text/plain;base64,aGk="]}, 400, "not an image"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["data:image/png;base64,%%%"]}, 400, "base64"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()]},
     400, "could not be used"),
    ("/search", {"query": "q", "k": 0}, 422, "k"),
    ("/search", {"query": "q", "k": "5"}, 422, "k"),
    ("/search", {"query": "q", "unknown": 1}, 422, "unknown"),
    ("/search", {"query": "q", "filter": "path ==="}, 400, "filter"),
    ("/search", [1, 2, 3], 422, "body"),
]


@pytest.mark.parametrize("path,body,status,mention", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_that_says_why(client, path, body, status, mention):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    res = client.post(path, **kwargs)
    assert res.status_code == status, res.text
    assert mention.lower() in res.text.lower()
    _assert_format(path, res, body)


def _assert_format(path, res, body):
    doc = res.json()
    if path == "/v2/rerank":
        assert set(doc) == {"message"}
    elif path == "/v1/rerank" or (path == "/rerank" and isinstance(body, dict) and "documents" in body):
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"} and doc["error"]["code"] == res.status_code
    elif path == "/rerank":
        assert set(doc) == {"error", "error_type"}
    else:
        assert set(doc) == {"detail"}


def test_unknown_documents_are_listed(client, served):
    demo = served[1]
    res = client.post("/v2/rerank", json={"model": "m", "query": "q", "documents": [demo.paths[0], "missing-1.png", "/no/such.jpg"]})
    assert res.status_code == 400
    msg = res.json()["message"]
    assert "2 of 3 documents" in msg and "[1] 'missing-1.png'" in msg and "[2] '/no/such.jpg'" in msg


def test_oversized_bodies_and_images_are_refused(client, served):
    big = "x" * (300 * 1024)
    for path, body in [("/v2/rerank", {"model": "m", "query": "q", "documents": [big]}), ("/rerank", {"query": "q", "texts": [big]}),
                       ("/v1/rerank", {"query": "q", "documents": [big]}), ("/search", {"query": big})]:
        res = client.post(path, json=body)
        assert res.status_code == 413, (path, res.text)
        _assert_format(path, res, body)

    def chunks():  # no Content-Length: the bound is enforced while the body streams in
        yield b'{"model": "m", "query": "q", "documents": ["'
        for _ in range(40):
            yield b"y" * 8192
        yield b'"]}'

    res = client.post("/v2/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert res.status_code == 413 and "larger than" in res.json()["message"]
    over = "data:image/png;base64," + "A" * (120 * 1024)  # ~90 KiB decoded: over the 64 KiB inline-image limit
    res = client.post("/v2/rerank", json={"model": "m", "query": "q", "documents": [over]})
    assert res.status_code == 400 and "65,536-byte limit" in res.json()["message"]


def test_api_key_is_required_when_set(served):
    server, demo = served
    body = {"model": "m", "query": "q", "documents": demo.paths[:1]}
    assert httpx.post(f"{server.url}/v2/rerank", json=body).status_code == 401
    wrong = httpx.post(f"{server.url}/v2/rerank", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["message"]
    assert httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": demo.paths[:1]}).json()["error"]["code"] == 401
    assert httpx.post(f"{server.url}/v2/rerank", json=body, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.post(f"{server.url}/v2/rerank", json=body, headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_errors_change_nothing_and_the_server_keeps_serving(client, reference, served):
    before = _state(reference)
    for path, body, *_ in BAD:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        assert client.post(path, **kwargs).status_code < 500
    assert client.get("/nope").status_code == 404
    assert client.get("/v2/rerank").status_code == 405
    assert _state(reference) == before
    order, _ = _expected(reference)
    ok = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": served[1].paths}).json()
    assert [served[1].paths[r["index"]] for r in ok["results"]] == order
