"""Unit tests for the cross-attention reranker model and its checkpoint format (tiny dims, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mm_retrieval.errors import ConfigError, IncompatibleError, InputError, ModelLoadError
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import RERANKER_FORMAT, load_reranker, save_reranker
from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttention, CrossAttentionScorer, RerankerConfig

DT, DI, P = 8, 12, 5  # tiny text width, image width, patches


def tiny_config(**kw) -> RerankerConfig:
    base = dict(text_dim=DT, image_dim=DI, width=16, depth=2, heads=4, kv_heads=2, memory_dim=8)
    base.update(kw)
    return RerankerConfig(**base)


def trained_like(cfg: RerankerConfig | None = None, seed: int = 0) -> CrossAttentionScorer:
    """A model whose head is not zero, so its ranking is not just the first stage's."""
    torch.manual_seed(seed)
    model = CrossAttentionScorer(cfg or tiny_config()).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head[-1].weight)
    return model


def make_inputs(B=3, L=6, N=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, DT, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):  # query b has L - b real tokens, the rest is padding
        mask[b, L - b :] = False
    images = torch.randn(N, P, DI, generator=g)
    score = torch.rand(B, N, generator=g) * 0.02  # tiny: let the head decide the ranking
    return text, mask, images, score


# ---------------------------------------------------------------------------------------------
# Shapes and attention variants


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_shapes(kv_heads):
    model = trained_like(tiny_config(kv_heads=kv_heads))
    text, mask, images, score = make_inputs(B=3, N=7)
    memory = model.image_memory(images)
    assert memory.shape == (7, P, 8)
    assert model(text, mask, memory, score).shape == (3, 7)
    assert model(text, mask, memory, score[0]).shape == (3, 7)  # [N] score is shared by all queries
    paired = model(text, mask, memory[:3], score[:, :3].diagonal(), pairs=True)
    assert paired.shape == (3,)
    assert paired.dtype == torch.float32


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cross_attention_matches_naive_grouped_attention(kv_heads):
    """Folding query-head groups into the length axis equals textbook GQA (repeat K/V per group)."""
    cfg = tiny_config(kv_heads=kv_heads)
    torch.manual_seed(0)
    attn = CrossAttention(cfg).eval()
    G0, G1, L = 2, 3, 5
    x = torch.randn(G0, 1, L, cfg.width)
    memory = torch.randn(G1, P, cfg.memory_dim)
    k, v = attn.project_kv(memory)  # [G1, Hkv, P, hd]
    k_grid = k[None].expand(G0, *k.shape).flatten(0, 1)
    v_grid = v[None].expand(G0, *v.shape).flatten(0, 1)
    out, att = attn(x, k_grid, v_grid, need_weights=True)

    H, hd, G = cfg.heads, cfg.head_dim, cfg.heads // kv_heads
    q = attn.q(attn.ln(x)).view(G0, 1, L, H, hd).transpose(2, 3)  # [G0, 1, H, L, hd]
    k_full = k.repeat_interleave(G, dim=1)[None]  # [1, G1, H, P, hd]
    v_full = v.repeat_interleave(G, dim=1)[None]
    w = torch.softmax(q @ k_full.transpose(-2, -1) / hd**0.5, dim=-1)  # [G0, G1, H, L, P]
    ref = attn.proj((w @ v_full).transpose(2, 3).reshape(G0, G1, L, cfg.width))
    torch.testing.assert_close(att, w)
    torch.testing.assert_close(out, ref)
    out_fast, none = attn(x, k_grid, v_grid, need_weights=False)  # the SDPA path
    assert none is None
    torch.testing.assert_close(out_fast, ref)


# ---------------------------------------------------------------------------------------------
# Masking, residual scoring, caching


def test_padding_does_not_change_the_output():
    model = trained_like()
    text, mask, images, score = make_inputs(B=3, L=6)
    memory = model.image_memory(images)
    base = model(text, mask, memory, score)

    # Same real tokens, padding made longer and filled with garbage.
    text2 = torch.cat([text, torch.randn(3, 4, DT) * 100], 1)
    mask2 = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(text2, mask2, memory, score), base)

    # Padding positions' content does not matter either.
    text3 = torch.where(mask[..., None], text, torch.randn_like(text) * 50)
    torch.testing.assert_close(model(text3, mask, memory, score), base)


def test_fresh_model_ranks_exactly_like_the_first_stage():
    torch.manual_seed(0)
    model = CrossAttentionScorer(tiny_config()).eval()
    text, mask, images, _ = make_inputs(B=2, N=20)
    score = torch.randn(2, 20)  # distinct first-stage cosines
    logits = model.score_images(text, mask, images, score)
    torch.testing.assert_close(logits, model.retrieval_scale.detach() * score, rtol=0, atol=0)
    assert torch.equal(logits.argsort(dim=1, descending=True), score.argsort(dim=1, descending=True))
    assert model.retrieval_scale.item() == pytest.approx(100.0)


def test_cached_fp16_memory_ranks_like_the_full_forward():
    model = trained_like()
    text, mask, images, score = make_inputs(B=2, N=16)
    full = model.score_images(text, mask, images, score)  # image side computed on the fly
    cached = model.image_memory(images).detach().half()  # what the index stores
    from_cache = model.score(text, mask, cached, score)
    torch.testing.assert_close(from_cache, full, rtol=0, atol=2e-2 * float(full.detach().std()))
    assert torch.equal(from_cache.argsort(dim=1), full.argsort(dim=1))


def test_memory_bytes_per_image():
    model = trained_like()
    memory = model.image_memory(torch.randn(3, P, DI)).half()
    assert memory[0].nbytes == model.memory_bytes_per_image(P) == P * 8 * 2
    assert model.memory_bytes_per_image(P, torch.float32) == memory[0].float().nbytes

    # Default config at ViT-B-32 sizes (49 patches of width 768) stays within 16 KiB per image.
    cfg = RerankerConfig(text_dim=512, image_dim=768)
    big = CrossAttentionScorer(cfg).eval()
    with torch.no_grad():
        mem = big.image_memory(torch.randn(1, 49, 768)).half()
    assert mem[0].nbytes == cfg.memory_bytes_per_image(49) == big.memory_bytes_per_image(49)
    assert cfg.memory_bytes_per_image(49) <= 16 * 1024


# ---------------------------------------------------------------------------------------------
# Attention maps, chunking, batching, determinism


def test_attention_maps():
    model = trained_like(tiny_config(heads=4, kv_heads=1))
    text, mask, images, score = make_inputs(B=3, L=6, N=7)
    memory = model.image_memory(images)
    plain = model(text, mask, memory, score)
    logits, maps = model(text, mask, memory, score, return_attention=True)
    torch.testing.assert_close(logits, plain)  # the explicit path applies the same weights as SDPA
    assert len(maps) == model.config.depth
    for att in maps:
        assert att.shape == (3, 7, 4, 6, P)  # [B, N, heads, L, P]
        assert (att >= 0).all()
        rows = att.sum(-1)  # [B, N, H, L]
        real = mask[:, None, None, :].expand_as(rows)
        torch.testing.assert_close(rows[real], torch.ones_like(rows[real]))
        assert (rows[~real] == 0).all()  # padding tokens attend to nothing

    diag = score[:, :3].diagonal()
    paired, pmaps = model(text, mask, memory[:3], diag, pairs=True, return_attention=True)
    assert pmaps[0].shape == (3, 4, 6, P)
    torch.testing.assert_close(pmaps[0], torch.stack([maps[0][i, i] for i in range(3)]))
    torch.testing.assert_close(paired, model(text, mask, memory[:3], diag, pairs=True))


def test_chunking_does_not_change_results():
    model = trained_like()
    text, mask, images, score = make_inputs(B=3, N=11)
    memory = model.image_memory(images)
    ref, ref_maps = model(text, mask, memory, score, chunk_size=10_000, return_attention=True)
    for chunk in (1, 2, 5, 7):
        out, maps = model(text, mask, memory, score, chunk_size=chunk, return_attention=True)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(maps[-1], ref_maps[-1])
    diag = score[:, :3].diagonal()
    torch.testing.assert_close(
        model(text, mask, memory[:3], diag, pairs=True, chunk_size=1),
        model(text, mask, memory[:3], diag, pairs=True, chunk_size=100),
    )


def test_batched_queries_equal_one_at_a_time_and_pairs_equal_the_diagonal():
    model = trained_like()
    text, mask, images, score = make_inputs(B=3, N=5)
    memory = model.image_memory(images)
    batched = model(text, mask, memory, score)
    for b in range(3):
        one = model(text[b : b + 1], mask[b : b + 1], memory, score[b])
        torch.testing.assert_close(one, batched[b : b + 1])
    paired = model(text, mask, memory[:3], score[:, :3].diagonal(), pairs=True)
    torch.testing.assert_close(paired, batched[:, :3].diagonal())


def test_deterministic():
    text, mask, images, score = make_inputs()
    a, b = trained_like(seed=3), trained_like(seed=3)
    out = a.score_images(text, mask, images, score)
    assert torch.equal(out, a.score_images(text, mask, images, score))
    assert torch.equal(out, b.score_images(text, mask, images, score))


def test_cpu_autocast_bf16_runs_and_roughly_agrees():
    model = trained_like()
    text, mask, images, score = make_inputs(B=2, N=9)
    memory = model.image_memory(images).detach().half()
    ref = model(text, mask, memory, score)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, maps = model(text, mask, memory, score, return_attention=True)
        plain = model(text, mask, memory, score)
    assert out.dtype == torch.float32 and maps[0].dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(plain).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1 * float(ref.detach().std()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_cpu(dtype):
    model = trained_like()
    text, mask, images, score = make_inputs(B=2, N=33)
    ref = model.score_images(text, mask, images, score)
    gpu = model.cuda()
    with torch.autocast("cuda", dtype=dtype):
        memory = gpu.image_memory(images.cuda()).half()
        out = gpu(text.cuda(), mask.cuda(), memory, score.cuda())
        out_att, _ = gpu(text.cuda(), mask.cuda(), memory, score.cuda(), return_attention=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0.1 * float(ref.detach().std()))
    torch.testing.assert_close(out_att.cpu(), ref, rtol=0, atol=0.1 * float(ref.detach().std()))


# ---------------------------------------------------------------------------------------------
# Config and input validation


def test_config_round_trip_and_errors():
    cfg = tiny_config(dropout=0.1, text_self_attn=False)
    assert RerankerConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    with pytest.raises(ConfigError, match="bogus") as info:
        RerankerConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert "memory_dim" in str(info.value) and "kv_heads" in str(info.value)  # lists valid keys
    with pytest.raises(ConfigError, match="image_dim"):
        RerankerConfig.from_dict({"text_dim": 8})
    with pytest.raises(ConfigError, match="divisible"):
        tiny_config(width=18)
    with pytest.raises(ConfigError, match="multiple of kv_heads"):
        tiny_config(kv_heads=3)


def test_no_self_attention_variant_runs():
    model = trained_like(tiny_config(text_self_attn=False, depth=1))
    text, mask, images, score = make_inputs()
    assert model.score_images(text, mask, images, score).shape == (3, 7)


def test_input_validation():
    model = trained_like()
    text, mask, images, score = make_inputs(B=2, N=4)
    memory = model.image_memory(images)
    bad_mask = mask.clone()
    bad_mask[1] = False
    with pytest.raises(InputError, match="at least one real token"):
        model(text, bad_mask, memory, score)
    with pytest.raises(InputError, match="memory must be"):
        model(text, mask, images, score)  # raw image tokens instead of memory
    with pytest.raises(InputError, match="retrieval_score"):
        model(text, mask, memory, score[:, :3])
    with pytest.raises(InputError, match="pairs=True"):
        model(text, mask, memory, score[0], pairs=True)
    with pytest.raises(InputError, match="image_tokens"):
        model.image_memory(torch.randn(2, P, DI + 1))


def test_patch_positions_tell_apart_images_that_differ_only_in_where_things_are():
    # Two images with the same patch tokens in swapped places: without positions the memory is a
    # set, so every query scores them alike; with num_patches each patch also knows its place.
    text, mask, images, _ = make_inputs(B=1, N=1)
    swapped = images.flip(1)  # the same patches, in reverse order
    pair = torch.cat([images, swapped])  # [2, P, DI]
    score = torch.zeros(2)
    with torch.no_grad():
        plain = trained_like(tiny_config())
        same = plain(text, mask, plain.image_memory(pair), score)
        model = trained_like(tiny_config(num_patches=P))
        logits = model(text, mask, model.image_memory(pair), score)
    assert float(same[0, 0]) == pytest.approx(float(same[0, 1]), abs=1e-5)
    assert abs(float(logits[0, 0] - logits[0, 1])) > 1e-3
    assert model.image_memory(pair).shape == (2, P, 8)  # same cached layout as without positions


def test_patch_positions_config_and_errors(tmp_path):
    cfg = tiny_config(num_patches=P)
    assert RerankerConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in tiny_config().to_dict().items() if k != "num_patches"}
    assert RerankerConfig.from_dict(old).num_patches == 0  # checkpoints from before still load
    with pytest.raises(ConfigError, match="num_patches"):
        tiny_config(num_patches=-1)
    model = trained_like(cfg)
    with pytest.raises(InputError, match=f"have {P + 1} patches but this reranker was trained on {P}"):
        model.image_memory(torch.randn(2, P + 1, DI))
    text, mask, images, score = make_inputs()
    loaded, _ = load_reranker(save_reranker(model, tmp_path / "rr", encoder_fingerprint="e"))
    assert torch.equal(loaded.score_images(text, mask, images, score), model.score_images(text, mask, images, score))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = trained_like()
    text, mask, images, score = make_inputs()
    out_dir = save_reranker(model, tmp_path / "rr", encoder_fingerprint="enc-abc", extra={"pairs": 123})
    # Exactly the two files: no temp files left behind.
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "reranker.json"]
    meta = json.loads((out_dir / "reranker.json").read_text())
    assert meta == {
        "format": RERANKER_FORMAT,
        "config": model.config.to_dict(),
        "encoder_fingerprint": "enc-abc",
        "extra": {"pairs": 123},
    }
    expected = model.score_images(text, mask, images, score)
    for path in (out_dir, out_dir / "reranker.json"):
        loaded, lmeta = load_reranker(path, expected_encoder_fingerprint="enc-abc")
        assert not loaded.training
        assert lmeta["encoder_fingerprint"] == "enc-abc" and lmeta["extra"] == {"pairs": 123}
        assert torch.equal(loaded.score_images(text, mask, images, score), expected)
    save_reranker(model, out_dir, encoder_fingerprint="enc-abc")  # overwriting in place works
    assert load_reranker(out_dir)[1]["extra"] == {}


def test_checkpoint_fingerprint_mismatch(tmp_path):
    save_reranker(trained_like(), tmp_path, encoder_fingerprint="enc-old")
    with pytest.raises(IncompatibleError) as info:
        load_reranker(tmp_path, expected_encoder_fingerprint="enc-new")
    msg = str(info.value)
    assert "enc-old" in msg and "enc-new" in msg and "mmr train-reranker" in msg


def test_checkpoint_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError) as info:
        load_reranker(missing)
    assert not isinstance(info.value, ModelLoadError)
    assert str(missing) in str(info.value) and "mmr train-reranker TABLE --out DIR" in str(info.value)


def test_checkpoint_damaged(tmp_path):
    model = trained_like()
    with pytest.raises(ModelLoadError, match="reranker.json is missing"):
        load_reranker(tmp_path)  # an empty directory

    ckpt = save_reranker(model, tmp_path / "a", encoder_fingerprint="e")
    (ckpt / "reranker.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_reranker(ckpt)

    ckpt = save_reranker(model, tmp_path / "b", encoder_fingerprint="e")
    meta = json.loads((ckpt / "reranker.json").read_text())
    (ckpt / "reranker.json").write_text(json.dumps({**meta, "format": "mm_retrieval.reranker/9"}))
    with pytest.raises(ModelLoadError, match="format"):
        load_reranker(ckpt)
    (ckpt / "reranker.json").write_text(json.dumps({**meta, "format": "something/else"}))
    with pytest.raises(ModelLoadError, match="not a reranker checkpoint"):
        load_reranker(ckpt)
    (ckpt / "reranker.json").write_text(json.dumps({**meta, "config": {**meta["config"], "bogus": 1}}))
    with pytest.raises(ModelLoadError, match="invalid config"):
        load_reranker(ckpt)
    (ckpt / "reranker.json").write_text(json.dumps({**meta, "config": {**meta["config"], "width": 32}}))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_reranker(ckpt)

    ckpt = save_reranker(model, tmp_path / "c", encoder_fingerprint="e")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_reranker(ckpt)

    with pytest.raises(InputError, match="JSON-serialisable"):
        save_reranker(model, tmp_path / "d", encoder_fingerprint="e", extra={"x": object()})


# ---------------------------------------------------------------------------------------------
# Training sanity


def test_training_learns_what_only_cross_attention_can_see():
    """Each query names 3 concepts (as text, through a rotation the model must learn); the positive
    image holds all 3 among its patches, the negative swaps one of them for another concept. The
    first-stage score is uninformative (0), so only text-token -> patch matching can separate them.
    """
    torch.manual_seed(0)
    D, K, L, NP = 16, 32, 3, 6  # feature width, concept vocabulary, query tokens, patches
    concepts = torch.randn(K, D)
    rotation = torch.linalg.qr(torch.randn(D, D))[0]  # text sees concepts in another basis
    g = torch.Generator().manual_seed(1)

    def batch(n):
        ids = torch.stack([torch.randperm(K, generator=g) for _ in range(n)])
        pos = ids[:, :NP].clone()  # holds the L queried concepts + fillers
        neg = pos.clone()
        neg[:, 0] = ids[:, NP]  # one queried concept replaced
        shuffle = torch.stack([torch.randperm(NP, generator=g) for _ in range(n)])
        rows = torch.arange(n)[:, None]
        text = concepts[ids[:, :L]] @ rotation.T
        return text, concepts[pos[rows, shuffle]], concepts[neg[rows, shuffle]]

    cfg = RerankerConfig(
        text_dim=D, image_dim=D, width=32, heads=4, kv_heads=2, memory_dim=16, retrieval_scale_init=1.0
    )
    model = CrossAttentionScorer(cfg)
    test_text, test_pos, test_neg = batch(256)

    def pairwise_accuracy():
        model.eval()
        with torch.no_grad():
            mask, zero = torch.ones(256, L, dtype=torch.bool), torch.zeros(256)
            sp = model.score_images(test_text, mask, test_pos, zero, pairs=True)
            sn = model.score_images(test_text, mask, test_neg, zero, pairs=True)
        model.train()
        return ((sp > sn).float() + 0.5 * (sp == sn).float()).mean().item()  # ties count half

    fresh = pairwise_accuracy()
    assert fresh == 0.5  # a fresh model only sees the (uninformative) first stage
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        text, pos, neg = batch(64)
        mask, zero = torch.ones(64, L, dtype=torch.bool), torch.zeros(64)
        sp = model.score_images(text, mask, pos, zero, pairs=True)
        sn = model.score_images(text, mask, neg, zero, pairs=True)
        loss = F.softplus(sn - sp).mean()  # pairwise logistic loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pairwise_accuracy() >= fresh + 0.2


def test_local_image_side_sees_neighbouring_patches_not_far_ones(tmp_path):
    # 64 px images on an 8 x 8 grid of 8 px patches: patch (2, 2) covers pixels 16-23. Its memory
    # must change with a pixel in the next patch (31, 31) -- a whole object is wider than one
    # patch -- and not with one three patches away (47, 47).
    cfg = tiny_config(num_patches=64, image_size=64, local_channels=8)
    model = CrossAttentionScorer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    tokens, pixels = torch.randn(1, 64, DI, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        base = model.image_memory(tokens, pixels)
        near, far = pixels.clone(), pixels.clone()
        near[..., 31, 31] += 5.0
        far[..., 47, 47] += 5.0
        patch = 2 * 8 + 2
        assert (model.image_memory(tokens, near)[0, patch] - base[0, patch]).abs().max() > 1e-4
        assert torch.equal(model.image_memory(tokens, far)[0, patch], base[0, patch])
    assert model.needs_pixels and not CrossAttentionScorer(tiny_config()).needs_pixels
    with pytest.raises(InputError, match=r"preprocessed pixels \[N, 3, 64, 64\]"):
        model.image_memory(tokens)
    with pytest.raises(InputError, match="preprocessed pixels"):
        model.image_memory(tokens, torch.zeros(1, 3, 32, 32))
    save_reranker(model, tmp_path, encoder_fingerprint="enc")  # the config round-trips
    loaded, _ = load_reranker(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.image_memory(tokens, pixels), base)


@pytest.mark.parametrize("bad", [dict(local_channels=8), dict(local_channels=8, num_patches=64),
                                 dict(local_channels=-1), dict(local_channels=8, num_patches=5, image_size=64)])
def test_local_image_side_config_errors(bad):
    with pytest.raises(ConfigError):
        CrossAttentionScorer(tiny_config(**bad))
