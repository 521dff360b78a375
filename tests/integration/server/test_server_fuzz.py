"""Fuzzing `mmr serve` over real HTTP: whatever the body, the answer is never a 5xx, always JSON,
and the collection is unchanged afterwards.

Two generators: schemathesis, from the app's own OpenAPI schema (valid and invalid cases per
operation), and hypothesis strategies that mix valid references, ids, inline images and junk so
that generated requests also reach the device. Example counts are bounded to keep this fast.
"""

import base64
import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_retrieval.server import ServerConfig

pytestmark = pytest.mark.slow  # hundreds of generated requests

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = ServerConfig(api_key=KEY, max_documents=12, max_body_bytes=128 * 1024, max_image_bytes=32 * 1024)
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def server_config():
    return CONFIG


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def state(served, client):
    """Items and token-cache sizes before fuzzing; checked again by the last test. (The first
    rerank derives every item's reranker memory from its raw tokens, once: do that first.)"""
    assert client.post("/v2/rerank", json={"model": "m", "query": "warm", "documents": served[1].paths}).status_code == 200
    return _state(served[1])


def _state(demo):
    from mm_retrieval.backfill import cache_info

    pipe = demo.pipeline(rerank=False)
    return pipe.store.count(), sorted(c["items"] for c in cache_info(pipe.store))


def _check(res: httpx.Response):
    assert res.status_code < 500, res.text
    json.loads(res.content)  # every answer, error or not, is JSON


def _tiny_png(seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8 + seed % 5, 6), (seed * 37 % 256, 90, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- hypothesis: structured junk that also reaches the device -------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def documents(draw, demo):
    valid_only = draw(st.booleans())  # half the lists are all usable, so the device is reached too
    kinds = st.sampled_from(["path", "path", "inline", "raw64", "part"] + ([] if valid_only else ["id", "junk", "badpart"]))
    out = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(kinds)
        if kind == "path":
            out.append(draw(st.sampled_from(demo.paths)))
        elif kind == "id":
            out.append(draw(st.text("0123456789abcdef", min_size=32, max_size=32)))
        elif kind == "inline":
            out.append("data:image/png;base64," + _tiny_png(draw(st.integers(0, 50))))
        elif kind == "raw64":
            out.append(_tiny_png(draw(st.integers(0, 50))))
        elif kind == "part":
            out.append({"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _tiny_png(draw(st.integers(0, 9)))}}]})
        elif kind == "badpart":
            out.append({"content": draw(st.lists(JSON, max_size=2))})
        else:
            out.append(draw(st.text(max_size=40) | JSON))
    return out


QUERY = st.sampled_from(["a red picture", "blue", " ", ""]) | st.text(max_size=60) | JSON


def test_rerank_endpoints_never_fail_with_a_5xx(served, client, state):
    _, demo = served
    statuses = []

    @FUZZ
    @given(path=st.sampled_from(["/v2/rerank", "/rerank", "/v1/rerank"]), query=QUERY, docs=documents(demo),
           top_n=st.none() | st.integers(-3, 20) | st.text(max_size=3), extra=st.dictionaries(st.text(max_size=10), JSON, max_size=3))
    def run(path, query, docs, top_n, extra):
        key = "texts" if path == "/rerank" and len(docs) % 2 else "documents"
        body = {**extra, "model": "m", "query": query, key: docs}
        if top_n is not None:
            body["top_n"] = top_n
        res = client.post(path, json=body)
        _check(res)
        statuses.append(res.status_code)
        if res.status_code == 200 and path == "/rerank" and key == "texts":
            assert sorted(r["index"] for r in res.json()) == list(range(len(docs)))

    run()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)  # both the device and the refusals were reached


def test_search_never_fails_with_a_5xx(client, state):
    @FUZZ
    @given(query=QUERY, k=st.none() | st.integers(-2, 40) | JSON, candidates=st.none() | st.integers(-2, 40),
           filter=st.sampled_from(["", 'path like "%red%"', "metadata[\"x\"] > 1", "(((", 'id in ["a"]']) | st.text(max_size=30),
           rerank=st.none() | st.booleans() | JSON)
    def run(query, k, candidates, filter, rerank):
        body = {k2: v for k2, v in {"query": query, "k": k, "candidates": candidates, "filter": filter, "rerank": rerank}.items() if v is not None}
        _check(client.post("/search", json=body))

    run()


def test_raw_bodies_never_fail_with_a_5xx(client, state):
    @FUZZ
    @given(path=st.sampled_from(["/v2/rerank", "/rerank", "/v1/rerank", "/search"]), body=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
           ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
    def run(path, body, ctype):
        _check(client.post(path, content=body, headers={"content-type": ctype} if ctype else {}))

    run()


# ---- schemathesis: cases generated from the app's OpenAPI schema ----------------------------
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_operations_never_fail_with_a_5xx(served, mode, state):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation import GenerationMode

    server, _ = served
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search", "/v2/rerank", "/rerank", "/v1/rerank", "/healthz", "/readyz"}
    for op in operations:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # GET /healthz and /readyz take no input: nothing to make invalid
        @settings(max_examples=15, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(GenerationMode(mode)))
        def run(case):
            res = case.call(base_url=server.url, headers=AUTH, timeout=60)
            assert res.status_code < 500, f"{case.method} {case.path} {case.body!r}: {res.status_code} {res.text[:300]}"

        run()


def test_fuzzing_changed_nothing(served, client, state):
    assert _state(served[1]) == state
    assert client.get("/readyz").json()["ready"] is True
