"""The reranker contract on the built-in cross-attention reranker: a seeded checkpoint whose head
dominates (so it reorders), over a collection indexed with the tiny encoder."""

from __future__ import annotations

import pytest

from mm_retrieval import Pipeline, registry
from mm_retrieval.testing.contracts import RerankerContract
from tests.helpers import COLORS, TINY, make_image


def _checkpoint(path, fingerprint):
    import torch

    from mm_retrieval.stages.rerankers.cross_attention.checkpoint import save_reranker
    from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig

    torch.manual_seed(0)
    model = CrossAttentionScorer(RerankerConfig(text_dim=64, image_dim=64, width=64, heads=2, memory_dim=32))
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 5.0)
        model.log_retrieval_scale.fill_(-5.0)
    save_reranker(model, path, encoder_fingerprint=fingerprint)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A pipeline over 8 indexed images, and a reranker checkpoint for its encoder."""
    root = tmp_path_factory.mktemp("cross-attention")
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / "photos" / f"{name}.png", rgb, seed=i)
    pipe = Pipeline(db=str(root / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})
    pipe.index(root / "photos", progress=False)
    yield pipe, _checkpoint(root / "rr", pipe.encoder.fingerprint)
    pipe.close()


@pytest.fixture(scope="module")
def reranker(collection):
    pipe, checkpoint = collection
    reranker = registry.create("reranker", "cross_attention", {"checkpoint": str(checkpoint), "device": "cpu"})
    reranker.bind(encoder=pipe.encoder, store=pipe.store)
    reranker.warm_up()
    return reranker


@pytest.fixture
def hits(collection):
    pipe, _ = collection
    return pipe.store.search(pipe.encoder.encode_text(["a purple picture"]), len(COLORS))[0]


class TestCrossAttentionReranker(RerankerContract):
    pass  # fixtures: the module's `reranker` and `hits`


# ---- reranker/blip_itm: its own image side, on a tiny random BLIP checkpoint -------------------
@pytest.fixture(scope="module")
def blip_collection(tmp_path_factory):
    """8 images indexed with the tiny encoder and the tiny BLIP's vision tokens."""
    pytest.importorskip("transformers")
    from mm_retrieval.testing.blip import make_tiny_blip

    root = tmp_path_factory.mktemp("blip-itm")
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / "photos" / f"{name}.png", rgb, seed=i)
    blip = make_tiny_blip(root / "blip-tiny")
    pipe = Pipeline(db=str(root / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4},
                    reranker={"checkpoint": str(blip), "device": "cpu"})
    pipe.index(root / "photos", progress=False)
    yield pipe
    pipe.close()


class TestBlipItmReranker(RerankerContract):
    @pytest.fixture
    def reranker(self, blip_collection):
        reranker = blip_collection.reranker
        reranker.warm_up()
        return reranker

    @pytest.fixture
    def hits(self, blip_collection):
        return blip_collection.store.search(blip_collection.encoder.encode_text(["a purple picture"]), len(COLORS))[0]
