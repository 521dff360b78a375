"""The open_clip encoder stage equals open_clip's own preprocess + encode_image/encode_text."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm_retrieval.errors import ConfigError, ModelLoadError
from mm_retrieval.models.tiny import register_tiny_configs
from mm_retrieval.stages.base import encode_files
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
    batches = list(encode_files(enc, paths, with_tokens=True))
    ours = np.concatenate([b[1] for b in batches])
    tokens = np.concatenate([b[2] for b in batches])

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
