"""The per-patch linear probe (bench/probe.py) run end to end on a real encoder (mmr-tiny); its
pure parts are tested in tests/unit/test_bench_probe.py."""

import pytest

from mm_retrieval.bench.probe import probe_encoder
from mm_retrieval.datasets import generate_compositional


@pytest.mark.slow  # ~20 s of CPU: 72 images through mmr-tiny and 20 probe fits
def test_probe_encoder_reports_every_depth(tmp_path):
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    data = generate_compositional(tmp_path, n_train=64, n_test=8, image_size=64)
    enc = OpenClipEncoder({"model": "mmr-tiny", "pretrained": "none", "device": "cpu", "workers": 0})
    doc = probe_encoder(enc, data.root, seeds=(0, 1), l2_grid=(1e-2,), iters=50)
    assert list(doc["layers"]) == ["pixels", "patch_embed", "block_0", "block_1", "final"]
    assert doc["penultimate"] == "block_0" and doc["patches_per_image"] == 64
    assert doc["chance"]["colour"]["uniform"] == pytest.approx(1 / 6, abs=1e-4)
    assert doc["patches"]["test"] == doc["patches"]["test_interior"] + doc["patches"]["test_edge"] > 0
    for lay in doc["layers"].values():
        assert len(lay["shape"]["test"]["per_seed"]) == 2
    # Colour is in the pixels: with labels and features aligned, even this little data reads it.
    assert doc["layers"]["pixels"]["colour"]["test"]["mean"] > 0.9
