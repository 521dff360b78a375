"""MMRReranker against a real `mmr serve` on 127.0.0.1 (the tiny demo collection)."""

import asyncio

import pytest
from langchain_core.documents import BaseDocumentCompressor, Document

from mm_retrieval.server import ServerConfig
from mmr_langchain import MMRRerankError, MMRReranker

KEY = "langchain-key"


@pytest.fixture(scope="module")
def server_config():  # `served` (the repository's conftest.py) starts with it
    return ServerConfig(api_key=KEY)


def _docs(paths):
    return [Document(page_content=f"photo {i}", metadata={"path": p, "n": i}) for i, p in enumerate(paths)]


def test_compressor_returns_the_best_documents_in_mmr_search_order(served):
    server, demo = served
    reranker = MMRReranker(url=server.url, api_key=KEY, top_n=3)
    assert isinstance(reranker, BaseDocumentCompressor)
    want = demo.pipeline().search("a red picture", k=3, candidates=8).hits
    got = reranker.compress_documents(_docs(demo.paths), "a red picture")
    assert [d.metadata["path"] for d in got] == [h.path for h in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([h.score for h in want], abs=1e-4)
    assert all(d.page_content == f"photo {d.metadata['n']}" for d in got)  # copies of the inputs, metadata kept

    again = asyncio.run(reranker.acompress_documents(_docs(demo.paths), "a red picture"))
    assert [d.metadata["path"] for d in again] == [d.metadata["path"] for d in got]


def test_page_content_is_the_reference_when_metadata_has_none(served):
    server, demo = served
    docs = [Document(page_content=p) for p in demo.paths]
    got = MMRReranker(url=server.url, api_key=KEY, top_n=None).compress_documents(docs, "blue")
    assert sorted(d.page_content for d in got) == sorted(demo.paths)


def test_errors_carry_the_servers_reason(served):
    server, demo = served
    with pytest.raises(MMRRerankError, match="missing.png"):
        MMRReranker(url=server.url, api_key=KEY).compress_documents([Document(page_content="missing.png")], "q")
    with pytest.raises(MMRRerankError, match="401"):
        MMRReranker(url=server.url, api_key="wrong").compress_documents(_docs(demo.paths), "q")
