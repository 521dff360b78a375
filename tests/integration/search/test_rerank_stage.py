"""The cross-attention reranker inside the search pipeline, with the token cache, and the
`Reranker` contract its public API keeps (score, score_batch, rerank, attention_maps)."""

import shutil

import numpy as np
import pytest
import torch

from mm_retrieval import Pipeline
from mm_retrieval.backfill import build_token_cache, cache_info
from mm_retrieval.errors import ConfigError, IncompatibleError, InputError
from mm_retrieval.evaluation import evaluate
from mm_retrieval.query import Query, encode_queries
from mm_retrieval.stages.base import Reranker as RerankerStage
from mm_retrieval.stages.rerankers.cross_attention import CrossAttentionReranker
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
from mm_retrieval.stages.rerankers.cross_attention.phrases import token_roles
from mm_retrieval.tokencache import TokenCache, caches_in, raw_cache_path
from mm_retrieval.types import Hit
from tests.helpers import COLORS, TINY

ENC = {**TINY, "workers": 0, "batch_size": 4}


def _checkpoint(path, fingerprint, *, perturb: bool, seed=0):
    torch.manual_seed(seed)
    model = CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32))
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
    done = build_token_cache(pipe.encoder, pipe.store, pipe.token_writer(), progress=False)
    assert done["encoded"] == len(COLORS) and done["items"] == len(COLORS)
    assert done["bytes_per_item"] == 64 * 32 * 2  # 8x8 patches x memory_dim 32, fp16
    assert len(pipe.search("red", k=3).hits) == 3
    assert build_token_cache(pipe.encoder, pipe.store, pipe.token_writer(), progress=False)["encoded"] == 0  # nothing left to do


def test_index_with_reranker_caches_its_memory(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    fp = Pipeline(db=db, encoder=ENC).encoder.fingerprint
    ck = _checkpoint(tmp_path / "rr", fp, perturb=True)
    pipe = Pipeline(db=db, encoder=ENC, reranker=str(ck))
    pipe.index(image_folder, progress=False)
    caches = cache_info(pipe.store)
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


# ---- the stage's public API (what search, the server, explain and bench call) ----------------
@pytest.fixture
def stage(tmp_path, indexed):
    """A warm cross_attention stage with a reordering checkpoint, its pipeline and first-stage hits."""
    db, fp = indexed
    pipe = Pipeline(db=db, reranker=str(_checkpoint(tmp_path / "rr", fp, perturb=True)))
    hits = pipe.search("a purple picture", k=len(COLORS), candidates=len(COLORS), rerank=False).hits
    rr = pipe.reranker
    rr.warm_up()
    return pipe, rr, hits


def test_index_run_without_reranker_writes_raw_tokens_where_raw_cache_path_says(tmp_path, indexed):
    db, fp = indexed
    pipe = Pipeline(db=db)
    assert caches_in(pipe.store.cache_dir()) == [raw_cache_path(pipe.store.cache_dir(), fp)]


def test_the_reranker_reads_the_querys_features_and_never_encodes_it(stage, monkeypatch):
    pipe, rr, hits = stage
    encoder, forwards = pipe.encoder, []
    for name in ("encode_text", "encode_text_tokens"):  # count the text tower's forwards, whoever asks
        real = getattr(encoder, name)
        monkeypatch.setattr(encoder, name, lambda *a, _real=real, **kw: (forwards.append(1), _real(*a, **kw))[1])
    q = Query("a purple picture", encoder)
    q.text_features()
    q.embedding()
    assert q.encodes == len(forwards) == 1
    ranked = rr.rerank(q, hits, 3)
    rr.score_batch([(q, hits), (q, hits[:2])])
    rr.attention_maps(q, hits[0])
    assert q.encodes == len(forwards) == 1 and len(ranked) == 3  # scoring, batching, explaining: the one forward


def test_score_batch_pairs_layout_equals_score_per_query(stage):
    pipe, rr, hits = stage
    queries = [Query(t, pipe.encoder) for t in ("a purple picture", "red", "something dark and green")]
    encode_queries(queries)
    assert [q.encodes for q in queries] == [1, 1, 1]  # one forward for all three
    requests = [(queries[0], hits), (queries[1], hits[:3]), (queries[2], []), (queries[0], hits[2:5])]
    batched = rr.score_batch(requests)
    alone = [rr.score(q, hs) if hs else np.zeros(0) for q, hs in requests]
    assert [len(b) for b in batched] == [len(hits), 3, 0, 3]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[1], batched[0][:3])  # another query, other scores


def test_score_batch_takes_patch_tokens_of_images_outside_the_collection(stage):
    pipe, rr, hits = stage
    q = Query("a purple picture", pipe.encoder)
    tokens = rr.raw_cache().get([hits[1].id])[hits[1].id]  # the encoder's patch tokens of an indexed image
    outside = Hit(id="not-indexed", path="", score=hits[1].retrieval_score, retrieval_score=hits[1].retrieval_score)
    (got,) = rr.score_batch([(q, [hits[0], outside])], image_tokens={"not-indexed": tokens})
    np.testing.assert_allclose(got, rr.score(q, hits[:2]), rtol=1e-5)  # scored like the indexed copy
    with pytest.raises(InputError, match="mmr cache build"):
        rr.score(q, [outside])  # without its tokens an unknown id has nothing to score


def test_attention_maps_per_layer_head_and_word(stage):
    pipe, rr, hits = stage
    q = Query("a small purple circle", pipe.encoder)
    att = rr.attention_maps(q, hits[0])
    assert att.words == ["a", "small", "purple", "circle"]
    assert att.maps.shape == (2, 2, 4, 8, 8)  # depth 2, heads 2, 4 words, 8x8 patches
    np.testing.assert_allclose(att.maps.sum(axis=(-1, -2)), 1.0, atol=1e-4)
    assert att.score == pytest.approx(float(rr.score(q, hits[:1])[0]), rel=1e-4)
    assert att.retrieval_score == pytest.approx(hits[0].retrieval_score)


def test_an_unbound_stage_says_what_it_needs(tmp_path, indexed):
    _, fp = indexed
    rr = CrossAttentionReranker({"checkpoint": str(_checkpoint(tmp_path / "rr", fp, perturb=False))})
    with pytest.raises(ConfigError, match="bind"):
        rr.warm_up()


def test_a_checkpoint_with_its_own_image_side_is_refused_clearly(tmp_path, indexed):
    # Training can give the model a conv image side over the pixels (local_channels); the index
    # path does not hand the stage pixels yet, so it says so instead of failing mid-index.
    db, fp = indexed
    model = CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32,
                                                num_patches=4, image_size=32, local_channels=8))
    save_reranker(model, tmp_path / "rr", encoder_fingerprint=fp)
    pipe = Pipeline(db=db, reranker=str(tmp_path / "rr"))
    with pytest.raises(ConfigError, match="own image side"):
        pipe.search("a purple picture", k=5)


def test_a_phrase_head_reads_the_roles_of_the_querys_words(tmp_path, indexed):
    # The phrase head needs which query tokens name the subject, the object and the relation;
    # the stage finds them from the query's text (phrases.token_roles) on every scoring path.
    db, fp = indexed
    torch.manual_seed(0)
    model = CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32,
                                                num_patches=64, phrase_dim=16))
    with torch.no_grad():  # a "trained" phrase head: it no longer adds zero
        model.phrases.direction.weight.normal_(0, 5.0)
        model.phrases.match.fill_(3.0)
    save_reranker(model, tmp_path / "rr", encoder_fingerprint=fp)
    pipe = Pipeline(db=db, reranker=str(tmp_path / "rr"))
    text = "a purple circle left of a green square"
    hits = pipe.search(text, k=len(COLORS), candidates=len(COLORS), rerank=False).hits
    rr = pipe.reranker
    rr.warm_up()
    q, other = Query(text, pipe.encoder), Query("a red square", pipe.encoder)
    got = rr.score(q, hits)

    feats = q.text_features()
    mask = feats.mask[None].cpu()
    roles = torch.from_numpy(token_roles(pipe.encoder.tokenizer, [text], mask.numpy()))
    assert set(roles.unique().tolist()) == {0, 1, 2, 3}
    memory = torch.from_numpy(rr.memories([h.id for h in hits]))
    retrieval = torch.tensor([h.first_stage_image_score for h in hits])
    with torch.no_grad():
        want = rr.model(feats.tokens[None].cpu(), mask, memory, retrieval, roles=roles)[0].numpy()
        without = rr.model(feats.tokens[None].cpu(), mask, memory, retrieval)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, without, atol=1e-3)  # the roles reached the head
    batched = rr.score_batch([(q, hits), (other, hits[:3])])  # the pairs layout, two queries
    np.testing.assert_allclose(batched[0], got, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batched[1], rr.score(other, hits[:3]), rtol=1e-4, atol=1e-4)
    att = rr.attention_maps(q, hits[0])
    assert att.score == pytest.approx(float(got[0]), rel=1e-4)
    ranked = pipe.search(text, k=len(COLORS), candidates=len(COLORS))
    assert {h.id: h.score for h in ranked.hits} == pytest.approx({h.id: float(s) for h, s in zip(hits, got)}, rel=1e-4)


class FirstStageOrder(RerankerStage):
    """A reranker with only the required methods: the base class provides the rest."""

    def score(self, query, hits):
        return np.array([h.retrieval_score for h in hits])

    def token_writer(self):
        return None


def test_the_base_class_batches_by_query_and_refuses_what_it_cannot_do(tiny_pipeline):
    rr = FirstStageOrder()
    assert not (rr.needs_text_features or rr.can_explain or rr.reads_image_tokens)
    q = Query("red", tiny_pipeline.encoder)
    hits = [Hit(id=str(i), path="", score=s, retrieval_score=s) for i, s in enumerate([0.1, 0.3, 0.2])]
    got = rr.score_batch([(q, hits), (q, [])])
    assert [g.tolist() for g in got] == [[0.1, 0.3, 0.2], []]
    assert [h.id for h in rr.rerank(q, hits, 2)] == ["1", "2"]
    with pytest.raises(InputError, match="indexed images only"):
        rr.score_batch([(q, hits)], image_tokens={"1": np.zeros((4, 4))})
    with pytest.raises(ConfigError, match="cannot show what it attended to"):
        rr.attention_maps(q, hits[0])
    assert q.encodes == 0  # nothing here needed the encoder
