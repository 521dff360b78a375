"""Milvus calls us: Milvus Lite's own search, given a model rerank Function with provider
"cohere" and base_url pointing at `mmr serve`, reorders its hits exactly as `mmr search --rerank`.

Milvus Lite (3.2) implements model rerank functions for provider "cohere" only: it posts
{model, query, documents: the candidates' `path` values, top_n} to `<base_url>/rerank` with
`Authorization: Bearer <api_key>`, reranks max(10 x limit, limit + offset) first-stage
candidates, and returns each hit's relevance_score as its distance.
"""

import pytest
from pymilvus import Function, FunctionType

from mm_retrieval.server import ServerConfig

KEY = "milvus-calls-us"


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(api_key=KEY)


@pytest.fixture(scope="module")
def pipe(served):
    return served[1].pipeline()


def _ranker(server, query, *, api_key=KEY):
    return Function(
        name="mmr_rerank",
        input_field_names=["path"],
        function_type=FunctionType.RERANK,
        params={"reranker": "model", "provider": "cohere", "model_name": "mmr", "queries": [query],
                "base_url": f"{server.url}/v2", "api_key": api_key},
    )


def _milvus_search(pipe, query, ranker, *, limit, filter=""):
    vec = pipe.encoder.encode_text([query])
    store = pipe.store
    return store.client.search(store.name, data=vec.tolist(), anns_field="vector", limit=limit, filter=filter,
                               output_fields=["path"], search_params={"metric_type": "IP"}, ranker=ranker)[0]


@pytest.mark.parametrize("query", ["a red picture", "something blue", "black and white"])
def test_milvus_lite_rerank_function_orders_like_mmr_search_rerank(served, pipe, query):
    server, _ = served
    first = pipe.search(query, k=8, rerank=False)
    hits = _milvus_search(pipe, query, _ranker(server, query), limit=5)
    want = pipe.search(query, k=5, candidates=50)  # Lite reranks 10 x limit candidates
    assert [h["entity"]["path"] for h in hits] == [h.path for h in want.hits]
    assert [h["distance"] for h in hits] == pytest.approx([h.score for h in want.hits], abs=1e-4)
    if query == "a red picture":  # the demo reranker really reorders the first stage
        assert [h.path for h in want.hits] != [h.path for h in first.hits][:5]


def test_with_a_filter_only_the_filtered_candidates_are_reranked(served, pipe):
    server, _ = served
    flt = 'path like "%e.png"'  # blue, purple, orange, white
    hits = _milvus_search(pipe, "a red picture", _ranker(server, "a red picture"), limit=3, filter=flt)
    want = pipe.search("a red picture", k=3, candidates=30, filter=flt)
    assert [h["entity"]["path"] for h in hits] == [h.path for h in want.hits]
    assert all(h["entity"]["path"].endswith("e.png") for h in hits)


def test_a_wrong_key_fails_the_milvus_search_loudly(served, pipe):
    server, _ = served
    with pytest.raises(Exception, match="401"):
        _milvus_search(pipe, "a red picture", _ranker(server, "a red picture", api_key="wrong"), limit=3)
