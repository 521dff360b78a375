"""MMRRerankFunction against a real `mmr serve` on 127.0.0.1 (the tiny demo collection)."""

import pytest
from pymilvus.model.base import BaseRerankFunction, RerankResult

from mm_retrieval.server import ServerConfig
from mmr_pymilvus import MMRRerankError, MMRRerankFunction

KEY = "plugin-key"


@pytest.fixture(scope="module")
def server_config():  # `served` (the repository's conftest.py) starts with it
    return ServerConfig(api_key=KEY)


def test_same_contract_as_pymilvus_rerank_functions_and_mmr_search_order(served):
    server, demo = served
    fn = MMRRerankFunction(server.url, api_key=KEY)
    assert isinstance(fn, BaseRerankFunction)
    want = demo.pipeline().search("a red picture", k=3, candidates=8).hits
    got = fn("a red picture", demo.paths, top_k=3)
    assert all(isinstance(r, RerankResult) for r in got)
    assert [r.text for r in got] == [h.path for h in want]
    assert [r.index for r in got] == [demo.paths.index(h.path) for h in want]
    assert [r.score for r in got] == pytest.approx([h.score for h in want], abs=1e-4)
    assert fn("a red picture", []) == []


def test_reranks_the_hits_of_a_milvus_search(served):
    server, demo = served
    pipe = demo.pipeline(rerank=False)
    vec = pipe.encoder.encode_text(["a blue picture"])
    hits = pipe.store.client.search(pipe.store.name, data=vec.tolist(), anns_field="vector", limit=8, output_fields=["path"])[0]
    best = MMRRerankFunction(server.url, api_key=KEY)("a blue picture", [h["entity"]["path"] for h in hits], top_k=8)
    assert [r.text for r in best] == [h.path for h in demo.pipeline().search("a blue picture", k=8, candidates=8).hits]


def test_errors_carry_the_servers_reason(served, monkeypatch):
    server, demo = served
    with pytest.raises(MMRRerankError, match="not-indexed.png") as e:
        MMRRerankFunction(server.url, api_key=KEY)("q", ["not-indexed.png"])
    assert e.value.status == 400
    monkeypatch.delenv("MMR_API_KEY", raising=False)
    with pytest.raises(MMRRerankError, match="401"):
        MMRRerankFunction(server.url)("q", demo.paths)
    monkeypatch.setenv("MMR_API_KEY", KEY)
    assert len(MMRRerankFunction(server.url)("q", demo.paths, top_k=2)) == 2
