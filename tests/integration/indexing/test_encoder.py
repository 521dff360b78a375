"""The open_clip encoder stage equals open_clip's own preprocess + encode_image/encode_text."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm_retrieval.encoding import ImageEncoding, encode_files
from mm_retrieval.errors import ConfigError, ModelLoadError
from mm_retrieval.models.tiny import register_tiny_configs
from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint file for mmr-tiny (random weights, saved as safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    register_tiny_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("mmr-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_embeddings_equal_open_clip(checkpoint, image_folder):
    import open_clip

    enc = OpenClipEncoder({"model": "mmr-tiny", "pretrained": str(checkpoint), "workers": 2, "batch_size": 3})
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    files = [f for batch in encode_files(ImageEncoding(enc, tokens=True), paths) for f in batch]
    assert [f.item.path for f in files] == paths
    ours = np.stack([f.vector for f in files])
    tokens = np.stack([f.tokens for f in files])

    model, _, preprocess = open_clip.create_model_and_transforms("mmr-tiny", pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer("mmr-tiny")
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
        ref = model.encode_image(pixels, normalize=True).numpy()
        texts = ["a red square", "two blue circles above a cat"]
        ref_text = model.encode_text(tokenizer(texts), normalize=True).numpy()

    assert ours.shape == ref.shape == (len(paths), enc.dim)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode_text(texts), ref_text, atol=1e-5)
    assert tokens.shape == (len(paths), 64, 64)  # 8x8 patches of width 64 (mmr-tiny)
    assert tokens.dtype == np.float16

    emb, tok, mask = enc.encode_text_tokens(texts)
    assert tok.shape[:2] == mask.shape == (2, 32)
    assert mask[0].sum() == 5  # <start> a red square <end>
    np.testing.assert_allclose(emb.numpy(), ref_text, atol=1e-5)


def test_fingerprint_tracks_weights(checkpoint, tmp_path):
    a = OpenClipEncoder({"model": "mmr-tiny", "pretrained": str(checkpoint)})
    b = OpenClipEncoder({"model": "mmr-tiny", "pretrained": "none"})
    c = OpenClipEncoder({"model": "mmr-tiny", "pretrained": "none", "seed": 1})
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == OpenClipEncoder({"model": "mmr-tiny", "pretrained": str(checkpoint)}).fingerprint


def test_random_init_is_reproducible_across_instances():
    texts = ["a green triangle"]
    a = OpenClipEncoder({"model": "mmr-tiny", "pretrained": "none"}).encode_text(texts)
    b = OpenClipEncoder({"model": "mmr-tiny", "pretrained": "none"}).encode_text(texts)
    np.testing.assert_array_equal(a, b)


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="Did you mean: .*ViT-B-32"):
        OpenClipEncoder({"model": "ViT-B-23"}).fingerprint


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        OpenClipEncoder({"model": "ViT-B-32", "pretrained": "laion9000"}).fingerprint


def test_missing_weights_file():
    with pytest.raises(ConfigError, match="not found"):
        OpenClipEncoder({"model": "mmr-tiny", "pretrained": "/nonexistent/w.safetensors"}).fingerprint


@pytest.mark.parametrize(
    "params",
    [
        {"model": "ViT-B-32"},  # default tag: laion2b_s34b_b79k from the hub
        {"model": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"},
    ],
)
def test_offline_weights_say_how_to_fix(params, tmp_path):
    # The hub is forced offline in tests (conftest), as on a machine without internet.
    enc = OpenClipEncoder({**params, "cache_dir": str(tmp_path / "empty-cache")})
    with pytest.raises(ModelLoadError) as e:
        enc.warm_up()
    msg = str(e.value)
    assert "could not fetch the weights" in msg and "--pretrained PATH" in msg


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip model directory.*train-encoder"):
        OpenClipEncoder({"model": str(tmp_path)}).fingerprint


def test_model_config_json(tmp_path):
    from mm_retrieval.models.tiny import CONFIG_DIR

    cfg = tmp_path / "my-arch.json"
    cfg.write_text((CONFIG_DIR / "mmr-tiny.json").read_text())
    enc = OpenClipEncoder({"model": str(cfg), "pretrained": "none"})
    assert enc.encode_text(["hello"]).shape == (1, 64)


TINY_CPU = {"model": "mmr-tiny", "pretrained": "none", "device": "cpu"}
MIXED = ["a red square", "two blue circles above a small cat near a big green tree", "", "dog"]


@pytest.mark.parametrize("arch", ["mmr-tiny", "mmr-small"])
def test_text_tower_runs_on_real_tokens_only_and_matches_open_clip(arch, tmp_path):
    """The trimmed text path equals open_clip's own encode_text (embeddings, and token features at
    every computed position) on a batch of mixed lengths, while the transformer sees only the
    batch's real positions."""
    import open_clip
    from safetensors.torch import save_file

    register_tiny_configs()
    torch.manual_seed(7)
    ref = open_clip.create_model(arch).eval()
    ckpt = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    tokenizer = open_clip.get_tokenizer(arch)
    ids = tokenizer(MIXED)
    captured = {}
    hook = ref.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    with torch.no_grad():
        ref_emb = ref.encode_text(ids, normalize=True)
    hook.remove()
    ref_tok = captured["tokens"]
    C = ids.shape[1]
    L = int((ids != 0).any(0).nonzero().max()) + 1  # the longest text: <start> + 12 words + <end>
    assert L == 14 < C

    enc = OpenClipEncoder({"model": arch, "pretrained": str(ckpt), "device": "cpu"})
    enc.warm_up()
    seen = []
    probe = enc.model.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    try:
        emb, tok, mask = enc.encode_text_tokens(MIXED)
        emb_only = enc.encode_text(MIXED)
    finally:
        probe.remove()
    assert seen == [L, L]  # the tower ran on L positions, not C, for both calls

    np.testing.assert_allclose(emb.numpy(), ref_emb.numpy(), atol=1e-5)
    np.testing.assert_allclose(emb_only, ref_emb.numpy(), atol=1e-5)
    assert tok.shape == (len(MIXED), C, ref_tok.shape[-1]) and mask.shape == (len(MIXED), C)  # callers' shapes kept
    assert torch.equal(mask, ids != 0)
    assert mask.sum(1).tolist() == [5, 14, 2, 3]
    np.testing.assert_allclose(tok[:, :L].numpy(), ref_tok[:, :L].numpy(), atol=1e-5)  # padding within L too
    assert not tok[:, L:].any()  # never computed: zeros, and masked

    full_emb, full_tok, full_mask = enc.encode_text_tokens(MIXED, full_context=True)
    assert torch.equal(full_mask, mask)
    np.testing.assert_allclose(full_tok.numpy(), ref_tok.numpy(), atol=1e-5)
    np.testing.assert_allclose(full_emb.numpy(), ref_emb.numpy(), atol=1e-5)

    # a text longer than the context is truncated by the tokenizer: all C positions are real
    long = ["word " * 100, "short"]
    with torch.no_grad():
        ref_long = ref.encode_text(tokenizer(long), normalize=True)
    np.testing.assert_allclose(enc.encode_text(long), ref_long.numpy(), atol=1e-5)


def test_text_trim_only_where_exact():
    """Non-causal towers and pooling at the last position keep the full path."""
    import open_clip

    from mm_retrieval.stages.encoders.open_clip import _trim_exact

    register_tiny_configs()
    model = open_clip.create_model("mmr-tiny")
    assert _trim_exact(model)
    model.text_pool_type = "last"  # reads position C-1: trimming would move it
    assert not _trim_exact(model)
    model.text_pool_type = "argmax"
    model.attn_mask = torch.zeros_like(model.attn_mask)  # bidirectional: later padding changes earlier tokens
    assert not _trim_exact(model)
    model.attn_mask = None
    assert not _trim_exact(model)
    assert not _trim_exact(model.visual)  # not a CLIP text tower at all


@pytest.mark.slow  # starts decode worker processes six times (~40 s on 2 cores)
def test_cpu_indexing_leaves_cores_to_decode_workers(image_folder):
    """While workers decode, torch runs on (its threads - workers) threads, restored afterwards,
    also when the loop is abandoned; no workers or an explicit index_threads behave as configured."""
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    default = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        def threads_during(**cfg):
            enc = OpenClipEncoder({**TINY_CPU, "batch_size": 4, **cfg})
            seen = [torch.get_num_threads() for _ in encode_files(ImageEncoding(enc), paths)]
            assert torch.get_num_threads() == 3
            return set(seen)

        assert threads_during(workers=2) == {1}
        assert threads_during(workers=1) == {2}
        assert threads_during(workers=0) == {3}
        assert threads_during(workers=1, index_threads=3) == {3}
        assert threads_during(workers=0, index_threads=2) == {2}

        batches = encode_files(ImageEncoding(OpenClipEncoder({**TINY_CPU, "batch_size": 2, "workers": 2})), paths)
        next(batches)
        assert torch.get_num_threads() == 1
        batches.close()  # a consumer that stops early
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(default)
