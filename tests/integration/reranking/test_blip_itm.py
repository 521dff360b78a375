"""Reranker ``blip_itm`` on a tiny random BLIP checkpoint saved with ``save_pretrained`` (no download).

Parity: the stage's ITM logits equal transformers' own ``BlipForImageTextRetrieval(input_ids,
pixel_values, use_itm_head=True)`` (fp32, CPU). Stated tolerances for the cached storage options,
on this tiny random model (ITM logits spread over about -6..3; its tokens have larger outliers
than a trained model's): fp32 1e-4 (exact), fp16 0.02 (0.004 seen), int8 0.3 (0.2 seen). How
int8 and 224 px change rankings with real weights is measured by `mmr bench`, not here.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.errors import ConfigError, IncompatibleError, InputError, MissingDependencyError, ModelLoadError
from mm_retrieval.query import Query
from mm_retrieval.stages.rerankers.blip_itm import BlipItmReranker, looks_like_blip
from mm_retrieval.stages.rerankers.blip_itm import storage as codec
from mm_retrieval.testing.blip import TINY_BLIP, cache_blip_tokens, install_in_hub_cache, make_tiny_blip
from tests.helpers import COLORS, TINY, make_image

transformers = pytest.importorskip("transformers")

QUERIES = ["a photo of dogs", "red car", "a cat sits on the big house .", "purple"]
TOL = {"fp32": 1e-4, "fp16": 0.02, "int8": 0.3}


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("ckpt") / "blip-tiny")


@pytest.fixture(scope="module")
def reference(blip_dir):
    """transformers' own model and processor, loaded from the same directory."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    return BlipForImageTextRetrieval.from_pretrained(blip_dir).eval(), BlipProcessor.from_pretrained(blip_dir)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A Milvus Lite collection of 8 images indexed by the tiny open_clip (no tokens)."""
    root = tmp_path_factory.mktemp("photos")
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / f"{name}.png", rgb, size=(72 + 8 * i, 56), seed=i)
    pipe = Pipeline(db=str(root.parent / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4}, cache_tokens=False)
    pipe.index(root, progress=False)
    return pipe


def _reranker(blip_dir, pipe=None, **params) -> BlipItmReranker:
    r = BlipItmReranker({"checkpoint": str(blip_dir), "device": "cpu", **params})
    if pipe is not None:
        r.bind(encoder=pipe.encoder, store=pipe.store)
    return r


def _images(n=4):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def _reference_itm(reference, images, texts, *, size=None, **forward) -> np.ndarray:
    """[texts, images] ITM match logits from transformers' forward, the texts padded as one batch."""
    model, proc = reference
    text = proc.tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    sized = {"size": {"height": size, "width": size}} if size else {}
    out = np.zeros((len(texts), len(images)))
    for j, im in enumerate(images):
        pixels = proc.image_processor(images=[im] * len(texts), return_tensors="pt", **sized)["pixel_values"]
        with torch.no_grad():
            out[:, j] = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels,
                              use_itm_head=True, **forward).itm_score[:, 1].numpy()
    return out


def _hits(pipe, text, k=8):
    return pipe.search(text, k=k, rerank=False).hits


# ---- image side ---------------------------------------------------------------------------
def test_image_transform_equals_blip_image_processor(blip_dir, reference):
    _, proc = reference
    r = _reranker(blip_dir)
    r.warm_up()
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (61, 97, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (33, 20, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 255, (300, 41), dtype=np.uint8), "L")
    pal = rgb.convert("P")
    pal.info["transparency"] = 3
    for im in (rgb, rgba, grey, pal):
        expected = proc.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
        got = r.transform(im)
        assert got.shape == expected.shape == (3, TINY_BLIP["image_size"], TINY_BLIP["image_size"])
        assert torch.allclose(got, expected, atol=1e-6), im.mode
    clone = pickle.loads(pickle.dumps(r.transform))  # it runs in decoding workers
    assert torch.equal(clone(rgb), r.transform(rgb))


# ---- parity -------------------------------------------------------------------------------
def test_itm_logits_equal_transformers_forward(blip_dir, reference):
    r = _reranker(blip_dir)
    images = _images()
    side = r.image_side()
    tokens = side.tokens(torch.stack([r.transform(im) for im in images]))
    assert tuple(tokens.shape[1:]) == side.shape == (17, TINY_BLIP["vision_width"])
    expected = _reference_itm(reference, images, QUERIES)  # padded text batch vs our unpadded query
    got = np.stack([r.itm_logits(Query(q, encoder=None), tokens) for q in QUERIES])
    assert np.abs(got - expected).max() < 1e-4
    assert np.ptp(expected, axis=1).min() > 0.1  # the tiny model tells the images apart: the check can fail
    # chunked like a large candidate list: same logits
    chunked = _reranker(blip_dir, chunk_size=3)
    assert np.abs(chunked.itm_logits(Query(QUERIES[0], None), tokens) - expected[0]).max() < 1e-4


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_scores_from_the_token_cache(blip_dir, reference, collection, storage):
    r = _reranker(blip_dir, collection, storage=storage)
    assert cache_blip_tokens(r, collection.store) == 8
    hits = _hits(collection, "a purple picture")
    paths = [h.path for h in hits]
    images = [Image.open(p) for p in paths]
    query = Query("a photo of a red car", collection.encoder)
    got = r.score(query, hits)
    itm = _reference_itm(reference, images, [query.text])[0]
    expected = itm + np.array([h.retrieval_score for h in hits])
    assert np.abs(got - expected).max() < TOL[storage]
    assert query.encodes == 0  # BLIP has its own text side: the first-stage encoder is never called
    assert r.query_tokens(query) is r.query_tokens(query)  # tokenised once per query (query.memo)
    out = r.rerank(query, hits, k=5)
    assert [h.score for h in out] == sorted(got, reverse=True)[:5]
    assert [h.rank for h in out] == [1, 2, 3, 4, 5]
    assert all(h.retrieval_score == {x.id: x.retrieval_score for x in hits}[h.id] for h in out)
    g = r.info()
    assert g["bytes_per_image"] == r.token_writer().cache.bytes_per_item == codec.stored_bytes(17, 48, storage)


def test_score_batch_pairs_several_queries_in_shared_chunks(blip_dir, collection):
    """The server's batcher path: rows of different (padded) queries share a forward; each
    request's scores equal scoring it alone."""
    r = _reranker(blip_dir, collection, storage="fp32", chunk_size=3)  # chunks mix queries
    cache_blip_tokens(r, collection.store)
    requests = [(Query(t, collection.encoder), _hits(collection, t, k=k)) for t, k in
                (("red", 4), ("a big yellow house with a small dog", 5), ("green cat", 2))]
    requests.insert(2, (Query("blue", collection.encoder), []))
    batched = r.score_batch(requests)
    assert [len(b) for b in batched] == [4, 5, 0, 2]
    for (q, hits), got in zip(requests, batched):
        assert np.allclose(got, _reranker(blip_dir, collection, storage="fp32").score(q, hits), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="indexed images only"):
        r.score_batch(requests[:1], image_tokens={"x": np.zeros((5, 4))})


def test_itc_weight_zero_ranks_by_itm_alone(blip_dir, collection):
    r = _reranker(blip_dir, collection, storage="fp32", itc_weight=0.0)
    cache_blip_tokens(r, collection.store)
    hits = _hits(collection, "green")
    full = _reranker(blip_dir, collection, storage="fp32")
    q = Query("green", collection.encoder)
    diff = full.score(q, hits) - r.score(q, hits)
    assert np.allclose(diff, [h.retrieval_score for h in hits], atol=1e-6)


def test_lower_resolution_interpolates_positions(blip_dir, reference, collection):
    """The 224-px option of a 384-px model, here 16 px for a 32-px one: fewer tokens, and
    transformers' own forward with interpolate_pos_encoding gives the same logits."""
    low = _reranker(blip_dir, collection, image_size=16, storage="fp32")
    assert low.info()["tokens"] == 5 and low.fingerprint.endswith("-16px-fp32")
    assert low.fingerprint != _reranker(blip_dir, collection, storage="fp32").fingerprint
    images = _images(3)
    tokens = low.image_side().tokens(torch.stack([low.transform(im) for im in images]))
    assert tokens.shape == (3, 5, TINY_BLIP["vision_width"])
    expected = _reference_itm(reference, images, QUERIES[:2], size=16, interpolate_pos_encoding=True)
    got = np.stack([low.itm_logits(Query(q, None), tokens) for q in QUERIES[:2]])
    assert np.abs(got - expected).max() < 1e-4
    cache_blip_tokens(low, collection.store)
    assert low.score(Query("red", collection.encoder), _hits(collection, "red")).shape == (8,)


def test_int8_codec_roundtrip_and_size():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, 577, 768)).astype(np.float32)
    x[0, 5] = 0.0  # an all-zero token
    x[1, 7, 3] = 40.0  # an outlier sets its token's scale
    q, scale = codec.quantize_int8(x)
    back = codec.dequantize_int8(q, scale)
    assert np.all(np.abs(back - x) <= scale.astype(np.float32)[..., None] / 2 + 1e-6)
    assert np.all(back[0, 5] == 0)
    stored = codec.encode(x, "int8")
    assert stored.dtype == np.float16 and stored.shape == (3, 577, 385)
    assert np.array_equal(codec.decode(stored, "int8", 768).numpy(), back)
    assert codec.stored_bytes(577, 768, "int8") == 444_290 <= 450_000  # the target for BLIP-base at 384 px
    assert codec.stored_bytes(577, 768, "fp16") == 886_272
    assert codec.stored_bytes(197, 768, "fp16") == 302_592  # 224 px
    assert np.array_equal(codec.decode(codec.encode(x, "fp32"), "fp32", 768).numpy(), x)


# ---- query side ---------------------------------------------------------------------------
def test_long_query_is_cut_to_512_tokens_and_said_once(blip_dir, collection, caplog):
    r = _reranker(blip_dir, collection, storage="fp16")
    cache_blip_tokens(r, collection.store)
    hits = _hits(collection, "red", k=3)
    long = " ".join(["a"] * 700)  # 700 tokens + [CLS] [SEP], within the 2000-character query limit
    with caplog.at_level(logging.WARNING):
        r.score(Query(long, collection.encoder), hits)
        r.score(Query(long + " dog", collection.encoder), hits)
    said = [m for m in caplog.messages if "cut to" in m]
    assert len(said) == 1 and "702" in said[0] and "512" in said[0]
    q = r.query_tokens(Query(long, collection.encoder))
    assert q.ids.shape == (1, 512) and q.truncated == 190
    assert int(q.ids[0, -1]) == r.tokenizer.sep_token_id


def test_enc_first_token_option(blip_dir):
    r = _reranker(blip_dir, first_token="enc")
    q = r.query_tokens(Query("red car", None))
    assert int(q.ids[0, 0]) == r.tokenizer.convert_tokens_to_ids("[ENC]")
    assert int(_reranker(blip_dir).query_tokens(Query("red car", None)).ids[0, 0]) == r.tokenizer.cls_token_id


# ---- explaining ---------------------------------------------------------------------------
def test_attention_maps_are_blips_cross_attention_per_word(blip_dir, reference, collection):
    r = _reranker(blip_dir, collection, storage="fp32")
    cache_blip_tokens(r, collection.store)
    hit = _hits(collection, "blue", k=1)[0]
    query = Query("dogs sits", collection.encoder)  # dog ##s, sit ##s: pieces merged into words
    cached = r.attention_maps(query, hit)
    fresh = r.attention_maps(query, hit, image=Image.open(hit.path))
    assert cached.words == ["dogs", "sits"]
    assert cached.maps.shape == (TINY_BLIP["layers"], TINY_BLIP["heads"], 2, 4, 4)
    assert np.allclose(cached.maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    assert np.allclose(cached.maps, fresh.maps, atol=1e-5)
    assert cached.score == pytest.approx(r.score(query, [hit])[0], abs=1e-5)
    assert cached.retrieval_score == hit.retrieval_score
    # against transformers: the text encoder's own cross-attentions, pieces averaged
    model, proc = reference
    inputs = proc(images=Image.open(hit.path), text=query.text, return_tensors="pt")
    with torch.no_grad():
        emb = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        out = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 encoder_hidden_states=emb, output_attentions=True)
    att = torch.stack([a[0] for a in out.cross_attentions])[..., 1:]  # [layers, heads, tokens, patches]
    att = att / att.sum(-1, keepdim=True)
    dogs = att[:, :, 1:3].mean(2).reshape(TINY_BLIP["layers"], TINY_BLIP["heads"], 4, 4).numpy()
    assert np.allclose(cached.maps[:, :, 0], dogs, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------
def test_collection_without_blip_tokens_names_cache_build(blip_dir, tmp_path, image_folder):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0}, cache_tokens=False)
    pipe.index(image_folder, progress=False)
    r = _reranker(blip_dir, pipe)
    with pytest.raises(InputError, match=r"no cached BLIP tokens.*mmr cache build --rerank"):
        r.score(Query("red", pipe.encoder), _hits(pipe, "red", k=3))


def test_cache_of_another_checkpoint_or_resolution_is_detected(blip_dir, tmp_path, image_folder):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0}, cache_tokens=False)
    pipe.index(image_folder, progress=False)
    cache_blip_tokens(_reranker(blip_dir, pipe), pipe.store)
    hits = _hits(pipe, "red", k=3)
    other = make_tiny_blip(tmp_path / "other", seed=1)
    for r in (_reranker(other, pipe), _reranker(blip_dir, pipe, image_size=16), _reranker(blip_dir, pipe, storage="int8")):
        with pytest.raises(IncompatibleError, match=r"another checkpoint, resolution or storage.*tokens-blip-.*mmr cache build"):
            r.score(Query("red", pipe.encoder), hits)


def test_token_writer_refuses_the_encoders_tokens(blip_dir, collection):
    writer = _reranker(blip_dir, collection).token_writer()
    with pytest.raises(IncompatibleError, match="image side"):
        writer.add("x" * 32, np.zeros((50, 64), np.float16))  # a CLIP's patch tokens


def test_not_a_blip_retrieval_model_is_refused(tmp_path, blip_dir):
    captioner = make_tiny_blip(tmp_path / "cap", architecture="BlipForConditionalGeneration")
    with pytest.raises(ConfigError, match="without the image-text matching head"):
        _reranker(captioner).warm_up()
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(bert)
    with pytest.raises(ConfigError, match=r"not a BLIP retrieval model: its config.json says model_type 'bert'"):
        _reranker(bert).warm_up()
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "reranker.json").write_text("{}")
    with pytest.raises(ConfigError, match="cross-attention reranker"):
        _reranker(ours).warm_up()
    with pytest.raises(ConfigError, match="not a file"):
        _reranker(blip_dir / "config.json").warm_up()
    with pytest.raises(ConfigError, match="storage"):
        BlipItmReranker({"checkpoint": str(blip_dir), "storage": "int4"})
    with pytest.raises(ConfigError, match="patch size"):
        _reranker(blip_dir, image_size=20).info()


def test_offline_hub_name_fails_at_once_naming_rerank_path(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"offline.*--rerank PATH") as e:
        BlipItmReranker({"checkpoint": "Salesforce/blip-itm-base-coco", "cache_dir": str(tmp_path)}).warm_up()
    assert time.monotonic() - t0 < 5
    assert "Salesforce/blip-itm-base-coco" in str(e.value)


def test_hub_name_found_in_the_cache_loads_offline(tmp_path, blip_dir):
    install_in_hub_cache(blip_dir, tmp_path / "hf", "tiny-org/blip-itm-tiny")
    r = BlipItmReranker({"checkpoint": "tiny-org/blip-itm-tiny", "cache_dir": str(tmp_path / "hf"), "device": "cpu"})
    r.warm_up()
    assert r.fingerprint == _reranker(blip_dir).fingerprint  # same files, same cached tokens
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(bert)
    (bert / "model.safetensors").write_bytes(b"x")
    (bert / "vocab.txt").write_text("[UNK]\n")
    install_in_hub_cache(bert, tmp_path / "hf", "tiny-org/bert")
    with pytest.raises(ConfigError, match="tiny-org/bert is not a BLIP retrieval model"):
        BlipItmReranker({"checkpoint": "tiny-org/bert", "cache_dir": str(tmp_path / "hf")}).warm_up()


def test_rerank_routing_helper(tmp_path, blip_dir):
    assert looks_like_blip(str(blip_dir))
    assert looks_like_blip("Salesforce/blip-itm-base-coco")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "reranker.json").write_text("{}")
    assert not looks_like_blip(str(ours))
    assert not looks_like_blip(str(tmp_path / "a" / "b" / "c"))


# ---- packaging ----------------------------------------------------------------------------
def test_registered_and_imports_nothing_heavy():
    from mm_retrieval import registry

    assert registry.get("reranker", "blip_itm") is BlipItmReranker
    code = ("import sys, mm_retrieval.stages.rerankers.blip_itm as b; "
            "print(b.BlipItmReranker.stage_name, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["blip_itm", "False", "False"]


def test_missing_transformers_gives_the_pip_command():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from mm_retrieval.stages.rerankers.blip_itm.load import require_transformers\n"
            "try:\n    require_transformers()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingDependencyError") and "pip install" in out and "transformers" in out
    assert MissingDependencyError.exit_code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_close_to_fp32(blip_dir):
    images = _images()
    cpu, gpu = _reranker(blip_dir), BlipItmReranker({"checkpoint": str(blip_dir), "device": "cuda"})
    px = torch.stack([cpu.transform(im) for im in images])
    ref = np.stack([cpu.itm_logits(Query(q, None), cpu.image_side().tokens(px)) for q in QUERIES])
    got = np.stack([gpu.itm_logits(Query(q, None), gpu.image_side().tokens(px)) for q in QUERIES])
    assert np.abs(got - ref).max() < 0.15  # bf16 autocast
