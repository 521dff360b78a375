"""Other stacks' own rerank clients, unchanged, against `mmr serve` on 127.0.0.1: Haystack's TEI,
vLLM and Cohere rankers, Cohere's SDK, and pymilvus' TEI rerank function. Each must return the
documents in `mmr search --rerank`'s order, with its scores."""

import os

import pytest

QUERY = "a red picture"
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"  # tests talk to 127.0.0.1 only
# `served` (conftest.py) starts without an API key, its default: pymilvus' TEI function can't send one.


@pytest.fixture(scope="module")
def expected(served):
    hits = served[1].pipeline().search(QUERY, k=8, candidates=8).hits
    return [h.path for h in hits], {h.path: h.score for h in hits}


def _haystack_docs(paths):
    from haystack import Document

    return [Document(content=p, meta={"source": "mmr"}) for p in paths]


def test_haystack_tei_ranker(served, expected):
    pytest.importorskip("haystack_integrations.components.rankers.huggingface_api")
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    server, demo = served
    order, score = expected
    ranker = HuggingFaceTEIRanker(url=server.url, top_k=5, token=None)
    docs = ranker.run(query=QUERY, documents=_haystack_docs(demo.paths))["documents"]
    assert [d.content for d in docs] == order[:5]
    assert [d.score for d in docs] == pytest.approx([score[p] for p in order[:5]], abs=1e-4)


def test_haystack_vllm_ranker(served, expected):
    pytest.importorskip("haystack_integrations.components.rankers.vllm")
    from haystack_integrations.components.rankers.vllm import VLLMRanker

    server, demo = served
    order, score = expected
    ranker = VLLMRanker(model="mmr", api_base_url=f"{server.url}/v1", api_key=None, top_k=4)
    out = ranker.run(query=QUERY, documents=_haystack_docs(demo.paths))
    assert [d.content for d in out["documents"]] == order[:4]
    assert out["meta"]["model"] == "mmr/reranker"
    assert [d.score for d in out["documents"]] == pytest.approx([score[p] for p in order[:4]], abs=1e-4)


def test_haystack_cohere_ranker(served, expected):
    pytest.importorskip("haystack_integrations.components.rankers.cohere")
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    server, demo = served
    order, _ = expected
    ranker = CohereRanker(model="rerank-v3.5", api_key=Secret.from_token("unused"), api_base_url=server.url, top_k=3)
    docs = ranker.run(query=QUERY, documents=_haystack_docs(demo.paths))["documents"]
    assert [d.content for d in docs] == order[:3]


def test_cohere_sdk_v2_client(served, expected):
    cohere = pytest.importorskip("cohere")
    server, demo = served
    order, score = expected
    res = cohere.ClientV2("unused", base_url=server.url).rerank(model="rerank-v3.5", query=QUERY, documents=demo.paths, top_n=8)
    assert [demo.paths[r.index] for r in res.results] == order
    assert [r.relevance_score for r in res.results] == pytest.approx([score[p] for p in order], abs=1e-4)
    assert res.meta.api_version.version == "2"


def test_pymilvus_tei_rerank_function(served, expected):
    pytest.importorskip("pymilvus.model.reranker")
    from pymilvus.model.reranker import TEIRerankFunction

    server, demo = served
    order, score = expected
    results = TEIRerankFunction(api_url=server.url)(QUERY, demo.paths)  # it keeps the first 5, whatever top_k says
    assert [r.text for r in results] == order[:5]
    assert [r.index for r in results] == [demo.paths.index(p) for p in order[:5]]
    assert [r.score for r in results] == pytest.approx([score[p] for p in order[:5]], abs=1e-4)
