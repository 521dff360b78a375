"""Both modalities in the index: text vectors next to image vectors, hybrid search, image queries."""

import pandas as pd
import pytest
import torch

from mm_retrieval import Pipeline
from mm_retrieval.errors import InputError
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
from tests.helpers import COLORS, TINY, make_image

ENC = {**TINY, "workers": 0}


@pytest.fixture
def mixed(tmp_path):
    """A table of: captioned images, images without captions, and text-only rows."""
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(tmp_path / "img" / f"{name}.png", rgb, seed=i)
        rows.append({"path": f"img/{name}.png", "caption": f"a {name} picture" if i < 5 else None,
                     "title": f"Title {name}", "tags": "colour"})
    rows.append({"path": None, "caption": "Maria's notes from Lisbon", "title": "notes", "tags": "text"})
    rows.append({"path": "", "caption": "a recipe for red soup", "title": "recipe", "tags": "text"})
    table = tmp_path / "mixed.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder=ENC)
    report = pipe.index(table, progress=False)
    assert report.indexed == len(COLORS) + 2 and report.skipped == 0
    return pipe, table, tmp_path


def test_text_vectors_only_where_there_is_text(mixed):
    pipe, _, _ = mixed
    assert pipe.store.count_with_text() == 5 + 2
    text_hits = pipe.search("notes from Lisbon", mode="text", k=20).hits
    assert len(text_hits) == 7  # no zero vectors of caption-less images among them
    assert text_hits[0].caption == "Maria's notes from Lisbon" and not text_hits[0].has_image
    image_hits = pipe.search("notes from Lisbon", mode="image", k=20).hits
    assert len(image_hits) == len(COLORS) and all(h.has_image and h.path for h in image_hits)


def test_hybrid_uses_milvus_fusion_and_auto_picks_it(mixed):
    pipe, _, _ = mixed
    res = pipe.search("a purple picture", k=20)
    assert res.mode == "hybrid"
    ids = [h.id for h in res.hits]
    assert len(ids) == len(set(ids)) == len(COLORS) + 2  # every item once: images and text items fused
    assert all(h.image_score is not None for h in res.hits if h.has_image)
    weighted = pipe.search("a purple picture", k=5, mode="hybrid")
    assert weighted.hits


def test_image_queries(mixed):
    pipe, _, root = mixed
    probe = root / "img" / "green.png"
    res = pipe.search(image=str(probe), mode="image", k=3)
    assert res.hits[0].path == str(probe) and res.hits[0].score == pytest.approx(1.0, abs=1e-4)
    auto = pipe.search(image=str(probe), k=3)  # auto, on a captioned collection: similar images
    assert auto.mode == "image" and [h.id for h in auto.hits] == [h.id for h in res.hits]
    by_id = pipe.search(image_id=res.hits[0].id, mode="image", k=3)
    assert [h.id for h in by_id.hits] == [h.id for h in res.hits]
    assert pipe.search(image=probe.read_bytes(), mode="image", k=1).hits[0].id == res.hits[0].id
    captions = pipe.search(image=str(probe), mode="text", k=3).hits  # image -> the texts that fit it
    assert len(captions) == 3 and all(h.caption for h in captions)


def test_reranker_applies_to_text_queries_over_images_only(mixed):
    pipe, _, root = mixed
    torch.manual_seed(0)
    ck = root / "rr"
    save_reranker(CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32)), ck,
                  encoder_fingerprint=pipe.encoder.fingerprint)
    rpipe = Pipeline(db=pipe.config.store.params["uri"], reranker=str(ck))
    pipe.close()
    hybrid = rpipe.search("a red picture", mode="hybrid", k=5)
    assert hybrid.reranked and all(h.has_image for h in hybrid.hits)  # the reranker ranks images
    for h in hybrid.hits:  # a fresh reranker scores 100 x the image cosine it builds on
        assert h.rerank_score == pytest.approx(100 * h.image_score, rel=1e-4)
    # ... so it ranks exactly like the image leg, and fused with the text leg again it gives back
    # the hybrid order: reranking never throws away what the captions found
    opts = rpipe.config.search
    plain = rpipe.store.hybrid_search(rpipe.encoder.encode_text(["a red picture"])[0], opts.candidates, ranker="rrf",
                                      rrf_k=opts.rrf_k, images_only=True)
    assert [h.id for h in hybrid.hits] == [h.id for h in plain[:5]]
    assert any(h.text_score is not None for h in hybrid.hits)
    assert [h.score for h in hybrid.hits] == sorted((h.score for h in hybrid.hits), reverse=True)
    assert not rpipe.search("a red picture", mode="text", k=5).reranked
    assert not rpipe.search(image=str(root / "img" / "red.png"), mode="image", k=3).reranked


def test_text_columns(tmp_path, mixed):
    _, table, root = mixed
    pipe = Pipeline(db=str(tmp_path / "cols.db"), encoder=ENC)
    pipe.index(table, progress=False, text_columns=["title", "tags"])
    assert pipe.store.count_with_text() == len(COLORS) + 2  # every row has a title now
    with pytest.raises(InputError, match="nope"):
        pipe.index(table, progress=False, text_columns=["title", "nope"])


def test_bad_input_changes_nothing(tmp_path, mixed, image_folder):
    pipe, _, root = mixed
    before = [(h.id, h.score) for h in pipe.search("a red picture", k=5).hits]
    junk = root / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a usable image"):
        pipe.search(image=str(junk))
    with pytest.raises(InputError, match="not found"):
        pipe.search(image=str(root / "missing.png"))
    with pytest.raises(InputError, match="exactly one"):
        pipe.search("red", image=str(junk))
    with pytest.raises(InputError, match="no indexed image"):
        pipe.search(image_id="0" * 32)
    assert [(h.id, h.score) for h in pipe.search("a red picture", k=5).hits] == before
    assert pipe.store.count() == len(COLORS) + 2

    images_only = Pipeline(db=str(tmp_path / "images.db"), encoder=ENC)
    images_only.index(image_folder, progress=False)
    with pytest.raises(InputError, match="needs text vectors"):
        images_only.search("red", mode="text")
    assert images_only.search("red").mode == "image"  # auto: no text vectors, image mode
