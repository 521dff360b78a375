"""The cross-attention reranker inside the search pipeline, with the token cache."""

import shutil

import numpy as np
import pytest
import torch

from conftest import COLORS, TINY
from mm_retrieval import Pipeline
from mm_retrieval.backfill import build_token_cache, cache_info
from mm_retrieval.errors import IncompatibleError, InputError
from mm_retrieval.evaluation import evaluate
from mm_retrieval.models.reranker import Reranker, RerankerConfig
from mm_retrieval.reranking import save_reranker
from mm_retrieval.tokencache import TokenCache

ENC = {**TINY, "workers": 0, "batch_size": 4}


def _checkpoint(path, fingerprint, *, perturb: bool, seed=0):
    torch.manual_seed(seed)
    model = Reranker(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32))
    if perturb:  # a "trained" head that dominates: no longer the first stage's ranking
        with torch.no_grad():
            model.head[-1].weight.normal_(0, 5.0)
            model.log_retrieval_scale.fill_(-5.0)
    save_reranker(model, path, encoder_fingerprint=fingerprint)
    return path


@pytest.fixture
def indexed(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    pipe = Pipeline(db=db, encoder=ENC)
    pipe.index(image_folder, progress=False)
    return db, pipe.encoder.fingerprint


def test_fresh_reranker_keeps_first_stage_order(tmp_path, indexed):
    db, fp = indexed
    ck = _checkpoint(tmp_path / "rr", fp, perturb=False)
    pipe = Pipeline(db=db, reranker=str(ck))
    first = pipe.search("a purple picture", k=5, rerank=False)
    rer = pipe.search("a purple picture", k=5)
    assert rer.reranked and not first.reranked
    assert [h.id for h in rer.hits] == [h.id for h in first.hits]
    for h in rer.hits:  # score = scale * retrieval score, retrieval score kept
        assert h.score == pytest.approx(100.0 * h.retrieval_score, rel=1e-4)
    assert rer.timings_ms["rerank"] > 0


def test_trained_reranker_reorders_deterministically_without_reading_images(tmp_path, indexed, image_folder):
    db, fp = indexed
    ck = _checkpoint(tmp_path / "rr", fp, perturb=True)
    pipe = Pipeline(db=db, reranker=str(ck))
    first = pipe.search("a purple picture", k=len(COLORS), rerank=False)
    shutil.rmtree(image_folder)  # reranking must use cached tokens, never the image files
    a = pipe.search("a purple picture", k=len(COLORS), candidates=len(COLORS))
    b = Pipeline(db=db, reranker=str(ck)).search("a purple picture", k=len(COLORS), candidates=len(COLORS))
    assert [h.id for h in a.hits] == [h.id for h in b.hits]
    assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits])
    assert sorted(h.id for h in a.hits) == sorted(h.id for h in first.hits)
    assert [h.id for h in a.hits] != [h.id for h in first.hits]
    by_id = {h.id: h.retrieval_score for h in first.hits}
    assert all(h.retrieval_score == pytest.approx(by_id[h.id]) for h in a.hits)


def test_checkpoint_from_other_encoder_is_refused(tmp_path, indexed):
    db, _ = indexed
    ck = _checkpoint(tmp_path / "rr", "0123456789abcdef", perturb=False)
    with pytest.raises(IncompatibleError, match="0123456789abcdef"):
        Pipeline(db=db, reranker=str(ck)).search("red")


def test_missing_checkpoint_names_the_fix(indexed, tmp_path):
    db, _ = indexed
    with pytest.raises(InputError, match="train-reranker"):
        Pipeline(db=db, reranker=str(tmp_path / "nope")).search("red")


def test_collection_without_tokens_then_backfill(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    base = Pipeline(db=db, encoder=ENC, cache_tokens=False)
    base.index(image_folder, progress=False)
    ck = _checkpoint(tmp_path / "rr", base.encoder.fingerprint, perturb=True)
    pipe = Pipeline(db=db, reranker=str(ck), encoder={"workers": 0})
    with pytest.raises(InputError, match="mmr cache build"):
        pipe.search("red")
    done = build_token_cache(pipe, progress=False)
    assert done["encoded"] == len(COLORS) and done["items"] == len(COLORS)
    assert done["bytes_per_item"] == 64 * 32 * 2  # 8x8 patches x memory_dim 32, fp16
    assert len(pipe.search("red", k=3).hits) == 3
    assert build_token_cache(pipe, progress=False)["encoded"] == 0  # nothing left to do


def test_index_with_reranker_caches_its_memory(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    fp = Pipeline(db=db, encoder=ENC).encoder.fingerprint
    ck = _checkpoint(tmp_path / "rr", fp, perturb=True)
    pipe = Pipeline(db=db, encoder=ENC, reranker=str(ck))
    pipe.index(image_folder, progress=False)
    caches = cache_info(pipe)
    assert len(caches) == 1 and caches[0]["items"] == len(COLORS)
    assert caches[0]["shape"] == [64, 32]
    assert len(pipe.search("red", k=3).hits) == 3


def test_cache_of_another_fingerprint_is_detected(tmp_path):
    path = tmp_path / "c.sqlite"
    c = TokenCache(path, "aaaa")
    c.add("x", np.ones((4, 2), np.float32))
    c.commit()
    with pytest.raises(IncompatibleError, match="aaaa"):
        TokenCache(path, "bbbb")
    with pytest.raises(IncompatibleError, match="shape"):
        TokenCache(path, "aaaa").add("y", np.ones((3, 2)))
    got = TokenCache(path, "aaaa").get(["x", "missing"])
    assert list(got) == ["x"] and got["x"].dtype == np.float16


def test_eval_document(tmp_path, image_folder):
    import pandas as pd

    rows = [{"path": str(p), "caption": f"a {p.stem} picture"} for p in sorted(image_folder.rglob("*.png"))]
    table = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    db = str(tmp_path / "mmr.db")
    fp = Pipeline(db=db, encoder=ENC).encoder.fingerprint
    ck = _checkpoint(tmp_path / "rr", fp, perturb=False)
    doc = evaluate(Pipeline(db=db, encoder=ENC, reranker=str(ck)), table, candidates=5, progress=False)
    assert doc["n_queries"] == len(COLORS) and doc["gallery"] == len(COLORS) and doc["candidates"] == 5
    assert set(doc["first_stage"]) == {"R@1", "R@5", "R@10"}
    assert doc["first_stage"]["R@10"] == 1.0  # 8 images: everything is in the top 10
    # a fresh reranker ranks like the first stage, so R@1 matches; R@5 can only improve within 5 candidates
    assert doc["reranked"]["R@1"] == doc["first_stage"]["R@1"]
