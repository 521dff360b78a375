"""Loading weights never runs code from the file.

A malicious pickle (its ``__reduce__`` creates a marker file) given as the encoder's
``pretrained`` checkpoint, inside an encoder model directory, or as a reranker's
``model.safetensors`` is refused with :class:`ModelLoadError`, and the marker is never created.
Each payload is first shown to be armed: a plain unpickle does create its marker.

open_clip (3.x) loads ``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``; but when that raises TypeError it retries *without*
``weights_only``, which unpickles everything on torch < 2.6 or with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``. The "tricky" payload raises TypeError inside the restricted
unpickler (an OrderedDict BUILD with slot state) before its code would run; the encoder checks
pickle-based checkpoints itself with ``weights_only=True`` first (no retry), so it is refused too.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm_retrieval import Pipeline
from mm_retrieval.errors import InputError, ModelLoadError
from mm_retrieval.stages.rerankers.cross_attention.checkpoint import META_FILE, WEIGHTS_FILE, load_reranker, save_reranker
from tests.helpers import COLORS, TINY, make_image

REFUSED = (ModelLoadError, InputError)


class SystemCall:
    """Unpickling this runs ``os.system(touch MARKER)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def tricky_pickle(marker: Path) -> bytes:
    """Raises TypeError in torch's weights-only unpickler, then (unrestricted) runs exec(...)."""
    code = f"open({str(marker)!r}, 'w').write('pwned')".encode()
    ordered_dict = b"ccollections\nOrderedDict\n)R"  # OrderedDict()
    build = b"N}X\x01\x00\x00\x00aK\x01s\x86b"  # BUILD with state (None, {'a': 1})
    run = b"cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code + b"\x85R"
    return b"\x80\x02" + ordered_dict + build + b"0" + run + b"."


def _armed(path: Path, marker: Path, *, torch_full: bool = False) -> None:
    """Show that the file really runs code when unpickled without restrictions (in a subprocess)."""
    loader = "import torch; torch.load(p, weights_only=False)" if torch_full else "import pickle; pickle.load(open(p, 'rb'))"
    subprocess.run([sys.executable, "-c", f"p = {str(path)!r}\ntry:\n    {loader}\nexcept Exception:\n    pass"],
                   check=True, timeout=120, capture_output=True)
    assert marker.exists(), f"{path.name} is not armed: the test would prove nothing"
    marker.unlink()


PAYLOADS = {
    "raw pickle": lambda marker, path: path.write_bytes(pickle.dumps(SystemCall(marker), protocol=2)),
    "torch.save zip": lambda marker, path: torch.save(SystemCall(marker), path),  # torch's zip format
    "tricky": lambda marker, path: path.write_bytes(tricky_pickle(marker)),
}


@pytest.fixture(scope="module")
def armed(tmp_path_factory):
    """Each payload, unpickled without restrictions in a subprocess, does create its marker."""
    d = tmp_path_factory.mktemp("armed")
    for name, write in PAYLOADS.items():
        marker, path = d / f"marker-{name}", d / f"{name}.pt"
        write(marker, path)
        _armed(path, marker, torch_full=name == "torch.save zip")


@pytest.fixture
def evil(tmp_path, armed):
    """name -> (payload file, the marker it would create); fresh markers for every test."""
    d = tmp_path / "payloads"
    d.mkdir()
    out = {}
    for i, (name, write) in enumerate(PAYLOADS.items()):
        marker, path = tmp_path / f"marker{i}", d / f"payload{i}.pt"
        write(marker, path)
        out[name] = (path, marker)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _encoder(pretrained: str | None = None, model: str = TINY["model"], seed: int = 0):
    from mm_retrieval import registry

    params = {"model": model, "workers": 0, "seed": seed, "pretrained": pretrained}
    return registry.create("encoder", "open_clip", {k: v for k, v in params.items() if v is not None})


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    enc = _encoder("none", seed=seed)
    enc.warm_up()
    return {k: v.detach().clone().contiguous() for k, v in enc.model.state_dict().items()}


# ---- the encoder ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raw pickle", "torch.save zip", "tricky"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_malicious_pretrained_checkpoint_is_refused(evil, tmp_path, monkeypatch, name, suffix):
    # the env var makes torch.load default to weights_only=False where a caller does not say
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, marker = evil[name]
    path = _copy(src, tmp_path / f"weights{suffix}")
    enc = _encoder(str(path))
    with pytest.raises(REFUSED) as e:
        enc.warm_up()
    assert str(path) in str(e.value) or path.name in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["raw pickle", "torch.save zip", "tricky"])
def test_malicious_pickle_named_safetensors_is_refused(evil, tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, marker = evil[name]
    path = _copy(src, tmp_path / "weights.safetensors")
    with pytest.raises(REFUSED):
        _encoder(str(path)).warm_up()
    assert not marker.exists()


def _model_dir(d: Path) -> Path:
    import open_clip

    from mm_retrieval.models.tiny import register_tiny_configs

    register_tiny_configs()
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": open_clip.get_model_config(TINY["model"]), "preprocess_cfg": {}}
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name", ["raw pickle", "tricky"])
@pytest.mark.parametrize("weights_name, beside", [
    ("open_clip_pytorch_model.bin", "model.safetensors"),  # open_clip prefers this .bin to model.safetensors
    ("pytorch_model.bin", None), ("model.pth", None), ("weights.bin", None),
])
def test_malicious_weights_in_model_directory_are_refused(evil, tmp_path, monkeypatch, name, weights_name, beside):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, marker = evil[name]
    d = _model_dir(tmp_path / "model")
    if beside:
        save_file(_state_dict(1), str(d / beside))
    _copy(src, d / weights_name)
    with pytest.raises(REFUSED):
        _encoder(model=str(d)).warm_up()
    assert not marker.exists()


def test_pickles_open_clip_does_not_pick_are_not_read(evil, tmp_path, monkeypatch):
    """A model directory's safetensors weights load; a pickle beside them that open_clip would not
    choose (an HF-style training_args.bin) is neither read nor a reason to refuse the model."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, marker = evil["raw pickle"]
    d = _model_dir(tmp_path / "model")
    save_file(_state_dict(1), str(d / "model.safetensors"))
    _copy(src, d / "training_args.bin")
    got = _encoder(model=str(d)).encode_text(["a red square"])
    assert abs(got - _encoder("none", seed=1).encode_text(["a red square"])).max() < 1e-5
    assert not marker.exists()


def test_valid_checkpoints_still_load(tmp_path):
    """safetensors, a torch.save state dict, and a model directory: the file's weights are used."""
    state = _state_dict(seed=1)  # not what seed 0 gives: proves the file was loaded
    reference = _encoder("none", seed=1).encode_text(["a red square"])
    random0 = _encoder("none", seed=0).encode_text(["a red square"])
    assert abs(reference - random0).max() > 1e-3

    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w-train.pt")  # open_clip_train's layout
    d = _model_dir(tmp_path / "model")
    save_file(state, str(d / "model.safetensors"))
    d2 = _model_dir(tmp_path / "model-bin")
    torch.save(state, d2 / "open_clip_pytorch_model.bin")
    for enc in (_encoder(str(tmp_path / "w.safetensors")), _encoder(str(tmp_path / "w.pt")),
                _encoder(str(tmp_path / "w-train.pt")), _encoder(model=str(d)), _encoder(model=str(d2))):
        got = enc.encode_text(["a red square"])
        assert abs(got - reference).max() < 1e-5


@pytest.mark.parametrize("garbage", ["empty", "text", "huge-header", "bad-json-header"])
def test_garbage_safetensors_pretrained_is_refused(tmp_path, garbage):
    data = {
        "empty": b"",
        "text": b"not a checkpoint at all",
        "huge-header": (2**62).to_bytes(8, "little") + b"{}",
        "bad-json-header": (10).to_bytes(8, "little") + b"{not json}",
    }[garbage]
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(REFUSED):
        _encoder(str(path)).warm_up()


# ---- the reranker ---------------------------------------------------------------------------


def _reranker_dir(d: Path, fingerprint: str = "enc-fp") -> Path:
    from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig

    cfg = RerankerConfig(text_dim=32, image_dim=48, width=32, depth=1, heads=2, kv_heads=1, memory_dim=16)
    save_reranker(CrossAttentionScorer(cfg), d, encoder_fingerprint=fingerprint)
    return d


@pytest.mark.parametrize("name", ["raw pickle", "torch.save zip", "tricky"])
def test_malicious_reranker_weights_are_refused(evil, tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, marker = evil[name]
    d = _reranker_dir(tmp_path / "reranker")
    assert json.loads((d / META_FILE).read_text())["format"]  # a valid reranker.json stays
    _copy(src, d / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_reranker(d)
    with pytest.raises(ModelLoadError):
        load_reranker(d / META_FILE)
    assert not marker.exists()


def test_valid_reranker_checkpoint_loads_and_ignores_pickles_beside_it(evil, tmp_path):
    d = _reranker_dir(tmp_path / "reranker")
    src, marker = evil["raw pickle"]
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pt"):  # never read
        _copy(src, d / name)
    model, meta = load_reranker(d, expected_encoder_fingerprint="enc-fp")
    assert meta["encoder_fingerprint"] == "enc-fp" and not model.training
    assert not marker.exists()


# ---- through the pipeline: refused, and the collection is intact -----------------------------


def test_pipeline_with_malicious_weights_leaves_collection_intact(evil, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    root = tmp_path / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / f"{name}.png", rgb, seed=i)
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={**TINY, "workers": 0}) as good:
        good.index(root, progress=False)
        fingerprint = good.encoder.fingerprint
        rows = {r["id"]: r["path"] for r in good.store.iter_rows(("id", "path"))}
        before = [(h.id, h.score) for h in good.search("a red square", k=20).hits]
    assert len(rows) == len(before) == len(COLORS)

    src, marker = evil["tricky"]
    weights = _copy(src, tmp_path / "evil.pt")
    with Pipeline(db=db, model=TINY["model"], pretrained=str(weights), encoder={"workers": 0}) as bad:
        with pytest.raises(REFUSED):
            bad.index(root, progress=False)
        with pytest.raises(REFUSED):
            bad.search("a red square")

    rdir = _reranker_dir(tmp_path / "reranker", fingerprint=fingerprint)  # right encoder: weights are read
    _copy(evil["raw pickle"][0], rdir / WEIGHTS_FILE)
    with Pipeline(db=db, encoder={**TINY, "workers": 0}, reranker=str(rdir)) as reranked:
        with pytest.raises(ModelLoadError):
            reranked.search("a red square")
    assert not marker.exists() and not evil["raw pickle"][1].exists()

    with Pipeline(db=db, encoder={**TINY, "workers": 0}) as again:
        assert again.store.count() == len(COLORS)
        assert {r["id"]: r["path"] for r in again.store.iter_rows(("id", "path"))} == rows
        after = [(h.id, h.score) for h in again.search("a red square", k=20).hits]
        assert [i for i, _ in after] == [i for i, _ in before]
        assert [s for _, s in after] == pytest.approx([s for _, s in before], abs=1e-5)
