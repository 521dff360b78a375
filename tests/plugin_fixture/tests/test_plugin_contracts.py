"""The test plugin's stages pass mm_retrieval's contract tests, as a third-party plugin's would.

The stages are created through the registry (the installed distribution's entry points), so this
also checks that what users get is what the contracts saw.
"""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.testing.contracts import RerankerContract, SourceContract
from mm_retrieval.types import Hit


class TestListingSource(SourceContract):
    @pytest.fixture
    def source(self, tmp_path):
        for name in ("a.png", "sub/b.png"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"")
        (tmp_path / "list.txt").write_text("a.png\n\nsub/b.png\n")
        return registry.create("source", "listing", {"path": str(tmp_path / "list.txt")})


class TestReverseReranker(RerankerContract):
    @pytest.fixture
    def reranker(self):
        return registry.create("reranker", "reverse", {"weight": 2.0})

    @pytest.fixture
    def hits(self):
        scores = [0.9, 0.7, 0.7, 0.2]  # a tie: rerank must keep its first-stage order
        return [Hit(id=f"{i:032x}", path=f"/img/{i}.png", score=s, retrieval_score=s, rank=i + 1)
                for i, s in enumerate(scores)]

    def test_reverses_the_first_stage(self, reranker, query, hits):
        assert [h.id for h in reranker.rerank(query, hits, 4)] == [hits[i].id for i in (3, 1, 2, 0)]
