"""`mmr explain`: the reranker's attention per query word, drawn over the image."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.errors import ConfigError, InputError
from mm_retrieval.explain import attention_maps, render_grid
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
from tests.helpers import TINY, make_image


@pytest.fixture
def setup(tmp_path, image_folder):
    db = str(tmp_path / "mmr.db")
    base = Pipeline(db=db, encoder={**TINY, "workers": 0})
    base.index(image_folder, progress=False)
    torch.manual_seed(0)
    ck = tmp_path / "rr"
    save_reranker(CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32)), ck,
                  encoder_fingerprint=base.encoder.fingerprint)
    base.close()
    return db, ck, image_folder


def test_maps_per_word(setup, tmp_path):
    db, ck, folder = setup
    pipe = Pipeline(db=db, reranker=str(ck))
    ex = attention_maps(pipe, "a small red circle", folder / "blue.png")
    assert ex.words == ["a", "small", "red", "circle"] and ex.image_id is not None
    assert ex.maps.shape == (4, 8, 8) and ex.head_maps.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(ex.maps.sum(axis=(1, 2)), 1.0, atol=1e-4)  # a distribution over patches per word
    # by id: the same pair, the same maps and the same score as the search path
    by_id = attention_maps(pipe, "a small red circle", ex.image_id)
    np.testing.assert_allclose(by_id.maps, ex.maps, atol=1e-6)
    hit = next(h for h in pipe.search("a small red circle", k=10, candidates=10).hits if h.id == ex.image_id)
    assert ex.score == pytest.approx(hit.score, rel=1e-4)
    out = render_grid(ex, tmp_path / "out.png")
    im = Image.open(out)
    assert im.size[0] == 4 * 224 and im.size[1] > 2 * 224  # image + whole query + 4 words = 6 panels, 2 rows


def test_unindexed_image_and_bad_refs(setup, tmp_path):
    db, ck, _ = setup
    pipe = Pipeline(db=db, reranker=str(ck))
    new = make_image(tmp_path / "new.png", (1, 200, 3), seed=77)
    ex = attention_maps(pipe, "green", new)
    assert ex.image_id is None and ex.maps.shape == (1, 8, 8)
    with pytest.raises(InputError, match="neither an image file nor the id"):
        attention_maps(pipe, "green", "f" * 32)
    with pytest.raises(ConfigError, match="--rerank"):
        attention_maps(Pipeline(db=db), "green", new)


def test_cli_writes_png(setup, tmp_path):
    db, ck, folder = setup
    out = tmp_path / "e.png"
    run = subprocess.run([sys.executable, "-m", "mm_retrieval", "explain", "a red picture", str(folder / "red.png") if (folder / "red.png").exists() else str(folder / "nested" / "red.png"),
                          "--db", db, "--rerank", str(ck), "-o", str(out), "--head", "1", "--layer", "0", "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["words"] == ["a", "red", "picture"] and doc["png"] == str(out)
    assert (doc["layers"], doc["heads"]) == (2, 2)
    assert Image.open(out).format == "PNG"


def test_one_layer_one_head_or_the_means(setup):
    db, ck, folder = setup
    ex = attention_maps(Pipeline(db=db, reranker=str(ck)), "a red picture", folder / "blue.png")
    full = ex.attention.maps  # [layers, heads, words, gh, gw]
    assert full.shape == (2, 2, 3, 8, 8) and (ex.layers, ex.heads) == (2, 2)
    np.testing.assert_allclose(ex.maps, full.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(ex.head_maps, full.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(ex.grid(layer=1), full[1].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(ex.grid(layer=0, head=1), full[0, 1], atol=1e-6)
    assert not np.allclose(ex.grid(layer=0), ex.grid(layer=1))  # the layers attend differently
    with pytest.raises(InputError, match=r"--layer 2: the reranker has 2 layers \(0..1\)"):
        ex.grid(layer=2)
    with pytest.raises(InputError, match="--head -1"):
        ex.grid(head=-1)


def test_a_reranker_that_cannot_explain_is_named(setup, tmp_path):
    from mm_retrieval.stages.base import Reranker as RerankerStage

    class FirstStageOrder(RerankerStage):
        def score(self, query, hits):
            return np.array([h.retrieval_score for h in hits])

        def token_writer(self):
            return None

    db, _, folder = setup
    with pytest.raises(ConfigError, match="cannot show what it attended to"):
        attention_maps(Pipeline(db=db, reranker=FirstStageOrder()), "green", folder / "blue.png")
