"""BLIP's text side with folded cross-attention keys and values (reranker/blip_itm, module ``itm``).

Both cross-attention paths, folded and standard, must give transformers' own
``BlipForImageTextRetrieval(input_ids, attention_mask, pixel_values, use_itm_head=True)`` logits
within 1e-5 in fp32 (and to float64 rounding in float64: the folding is exact algebra), on a batch
of queries of different lengths padded together, with the vision tokens never padded. The random
checkpoints here get random query/key/value biases (transformers initialises them to zero), so
the ``q . b_k`` term that folding drops is really there to cancel.

1e-5 is float32 rounding on these random models: transformers' own fp32 forward of the tiny one is
2e-5 (attention biases of std 0.1) to 6e-5 (std 0.5) away from its float64 forward, and the
folded text side is as close to float64 as the standard one (1e-5; measured when this was written).
With the larger biases the fp32 gap reaches 1.05e-5, so the tiny model's biases have std 0.1 and
the float64 test uses std 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mm_retrieval.errors import ConfigError
from mm_retrieval.query import Query
from mm_retrieval.stages.rerankers.blip_itm import BlipItmReranker
from mm_retrieval.stages.rerankers.blip_itm.itm import (
    PATHS,
    BlipItmTextSide,
    TextGeometry,
    break_even_tokens,
    text_macs,
)
from mm_retrieval.stages.rerankers.blip_itm.stage import _padded
from mm_retrieval.testing.blip import TINY_BLIP, make_tiny_blip

transformers = pytest.importorskip("transformers")

QUERIES = ["red", "a photo of dogs", "a cat sits on the big house with a small green ball ."]  # 3, 7 and 16 tokens


def _random_biases(model, seed: int = 1, std: float = 0.1) -> None:
    """Every attention projection of the text encoder gets a random bias (zero after init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.text_encoder.encoder.layer:
            for attn in (layer.attention.self, layer.crossattention.self):
                for lin in (attn.query, attn.key, attn.value):
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """The tiny checkpoint, saved again with random attention biases."""
    from transformers import BlipForImageTextRetrieval

    d = make_tiny_blip(tmp_path_factory.mktemp("ckpt") / "blip-tiny-biased")
    model = BlipForImageTextRetrieval.from_pretrained(d).eval()
    _random_biases(model)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(blip_dir):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    return BlipForImageTextRetrieval.from_pretrained(blip_dir).eval(), BlipProcessor.from_pretrained(blip_dir)


def _images(n: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size + 7 * i, size + 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _transformers_itm(model, text, pixels) -> np.ndarray:
    """[texts, images] match logits of transformers' forward: the texts as one padded batch
    against each image (its vision model runs on the pixels)."""
    out = []
    with torch.no_grad():
        for px in pixels:
            rows = px[None].expand(len(text["input_ids"]), *px.shape)
            out.append(model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=rows,
                             use_itm_head=True).itm_score[:, 1].double().numpy())
    return np.stack(out, axis=1)


def _ours(side, text, tokens, path, **kw) -> tuple[np.ndarray, list]:
    """The same [texts, images] logits from our text side: every (text, image) pair one row."""
    t, n = len(text["input_ids"]), len(tokens)
    ids = text["input_ids"].repeat_interleave(n, 0)
    mask = text["attention_mask"].repeat_interleave(n, 0)
    with torch.no_grad():
        logits, maps = side.forward(ids, mask, tokens.repeat(t, 1, 1), path=path, **kw)
    return logits[:, 1].double().numpy().reshape(t, n), maps


def test_both_paths_equal_transformers_on_the_tiny_model(reference):
    model, proc = reference
    text = proc.tokenizer(QUERIES, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert text["attention_mask"].sum(1).tolist() == [3, 7, 16]  # padded together, to the longest only
    pixels = proc.image_processor(images=_images(3), return_tensors="pt")["pixel_values"]
    expected = _transformers_itm(model, text, pixels)
    assert np.ptp(expected, axis=1).min() > 0.1  # images told apart: the comparison can fail
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=pixels).last_hidden_state  # [3, 17, 48]: never padded
        ref = model.text_encoder(input_ids=text["input_ids"].repeat_interleave(3, 0),
                                 attention_mask=text["attention_mask"].repeat_interleave(3, 0),
                                 encoder_hidden_states=tokens.repeat(3, 1, 1), output_attentions=True)
    side = BlipItmTextSide(model)
    for path in PATHS:
        got, _ = _ours(side, text, tokens, path)
        assert np.abs(got - expected).max() < 1e-5, path
        # explain's maps: every row of every layer (the last too), equal to transformers' weights
        full, maps = _ours(side, text, tokens, path, attentions=True)
        assert np.abs(full - expected).max() < 1e-5, path
        assert len(maps) == TINY_BLIP["layers"]
        for ours, theirs in zip(maps, ref.cross_attentions):
            assert ours.shape == theirs.shape == (9, TINY_BLIP["heads"], 16, 17)
            assert (ours - theirs).abs().max() < 1e-5, path


def test_folding_is_exact_algebra_in_float64(blip_dir, reference):
    """In float64 the two paths and transformers agree to rounding (1e-10), with attention biases
    of std 1 (q . b_k large against the scores it cancels out of)."""
    from transformers import BlipForImageTextRetrieval

    _, proc = reference
    m64 = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    _random_biases(m64, seed=2, std=1.0)
    m64 = m64.double()
    text = proc.tokenizer(QUERIES, return_tensors="pt", padding=True, return_token_type_ids=False)
    pixels = proc.image_processor(images=_images(2), return_tensors="pt")["pixel_values"].double()
    expected = _transformers_itm(m64, text, pixels)
    with torch.no_grad():
        tokens = m64.vision_model(pixel_values=pixels).last_hidden_state
    side = BlipItmTextSide(m64)
    for path in PATHS:
        assert np.abs(_ours(side, text, tokens, path)[0] - expected).max() < 1e-10, path


@pytest.mark.slow  # BLIP-base's text side on 6 pairs, three times: 15-45 s on 2 shared cores
def test_blip_base_sized_model_both_paths_equal_transformers():
    """BLIP-base's text side (12 layers, width 768, 12 heads, cross-attending to 577 tokens of
    width 768 from a 384-px ViT-B/16 input), random weights and biases, no download. The vision
    tower keeps BLIP-base's width and token count but one layer: it only produces the tokens."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig(text_config={"num_attention_heads": 12, "is_decoder": True},
                        vision_config={"num_hidden_layers": 1})
    g = TextGeometry.of(config)
    assert (g.layers, g.hidden, g.heads, g.encoder_width) == (12, 768, 12, 768)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForImageTextRetrieval(config).eval()
    _random_biases(model, std=0.5)
    lengths = [5, 12, 40]  # token ids drawn at random: [CLS] ... [SEP], right-padded to 40 and masked
    ids = torch.zeros((3, 40), dtype=torch.long)
    mask = torch.zeros((3, 40), dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 30000, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    pixels = torch.randn((2, 3, 384, 384), generator=gen)
    text = {"input_ids": ids, "attention_mask": mask}
    expected = _transformers_itm(model, text, pixels)
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (2, 577, 768)
    side = BlipItmTextSide(model)
    for path in PATHS:
        got, _ = _ours(side, text, tokens, path)
        assert np.abs(got - expected).max() < 1e-5, (path, np.abs(got - expected).max())


def test_macs_are_what_the_forward_multiplies(reference):
    """text_macs() equals the multiply-accumulates torch counts in the forward (matmuls, linear
    layers, attention), per path, padding and the [CLS]-only last layer included."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = reference
    side = BlipItmTextSide(model)
    n, L, P = 3, 7, 17
    tokens = torch.randn(n, P, TINY_BLIP["vision_width"])
    ids = torch.randint(7, 40, (n, L))
    for path in PATHS:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            side.forward(ids, torch.ones_like(ids), tokens, path=path)
        # torch's counter skips the CPU's fused attention kernel (scores and context): self-attention's
        # 2 L L d per full layer and 2 L d in the last, the standard path's cross-attention 2 L P d
        d, full = TINY_BLIP["text_width"], TINY_BLIP["layers"] - 1
        fused = 2 * L * L * d * full + 2 * L * d + (2 * L * P * d * full if path == "standard" else 0)
        assert counter.get_total_flops() == 2 * n * (text_macs(side.geometry, L, P, path) - fused), path


def test_break_even_of_blip_base():
    from transformers import BlipConfig

    g = TextGeometry.of(BlipConfig(text_config={"num_attention_heads": 12}))
    assert break_even_tokens(g, 577) == 62  # where 2 H L P e + 2 L d e reaches 2 P e d + 2 L P d
    short = text_macs(g, 12, 577, "folded"), text_macs(g, 12, 577, "standard")
    assert 2.5e9 < short[0] < 2.8e9 and 8.5e9 < short[1] < 9e9  # the bench query's 12 tokens: 3.2x fewer
    assert text_macs(g, 100, 577, "folded") > text_macs(g, 100, 577, "standard")


def test_stage_picks_the_path_by_query_length(blip_dir, reference):
    r = BlipItmReranker(checkpoint=str(blip_dir), device="cpu")
    r.warm_up()
    g = r._text.geometry
    assert r.fold_max_tokens == max(1, round(0.8 * break_even_tokens(g, 17)))
    assert r.cross_attention_path(1) == "folded"
    assert r.cross_attention_path(r.fold_max_tokens) == "folded"
    assert r.cross_attention_path(r.fold_max_tokens + 1) == "standard"
    assert BlipItmReranker(checkpoint=str(blip_dir), device="cpu", fold_max_tokens=3).cross_attention_path(4) == "standard"
    for forced in PATHS:
        assert BlipItmReranker(checkpoint=str(blip_dir), cross_attention=forced).cross_attention_path(1000) == forced
    with pytest.raises(ConfigError, match="cross_attention"):
        BlipItmReranker(checkpoint=str(blip_dir), cross_attention="fold")
    with pytest.raises(ConfigError, match="fold_max_tokens"):
        BlipItmReranker(checkpoint=str(blip_dir), fold_max_tokens=-1)


def test_stage_scores_equal_transformers_whichever_path(blip_dir, reference):
    """The stage's own entry (unpadded single query, and mixed-length queries padded in one
    chunk, as the server's batcher sends them) on both sides of the switch point."""
    model, proc = reference
    images = _images(3)
    pixels = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = proc.tokenizer(QUERIES, return_tensors="pt", padding=True, return_token_type_ids=False)
    expected = _transformers_itm(model, text, pixels)
    for fold_max in (1, 4, 100):  # all standard, mixed (the 3-token query folds alone), all folded
        r = BlipItmReranker(checkpoint=str(blip_dir), device="cpu", fold_max_tokens=fold_max)
        tokens = r.image_side().tokens(torch.stack([r.transform(im) for im in images]))
        alone = np.stack([r.itm_logits(Query(q, None), tokens) for q in QUERIES])
        assert np.abs(alone - expected).max() < 1e-5, fold_max
        qs = [r.query_tokens(Query(q, None)) for q in QUERIES]
        ids, mask = _padded([q for q in qs for _ in images])
        assert r.cross_attention_path(int(ids.shape[1])) == ("folded" if fold_max == 100 else "standard")
        together = r._itm(ids, mask, tokens.repeat(len(QUERIES), 1, 1))[0].reshape(len(QUERIES), len(images))
        assert np.abs(together - expected).max() < 1e-5, fold_max
