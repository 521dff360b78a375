"""Save and load checkpoints of the cross-attention model (:class:`.model.CrossAttentionScorer`).

A checkpoint is a directory::

    DIR/model.safetensors   the state dict (safetensors only: loading never unpickles anything)
    DIR/reranker.json       {"format": "mm_retrieval.reranker/1", "config": {...},
                             "encoder_fingerprint": "...", "extra": {...}}

The encoder fingerprint ties the reranker to the CLIP encoder whose token features it was trained
on; features from another encoder would be meaningless to it, so loading can refuse the mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ....errors import ConfigError, IncompatibleError, InputError, ModelLoadError
from .model import CrossAttentionScorer, RerankerConfig

__all__ = ["RERANKER_FORMAT", "WEIGHTS_FILE", "META_FILE", "save_reranker", "load_reranker"]

RERANKER_FORMAT = "mm_retrieval.reranker/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "reranker.json"
_TRAIN_HINT = "train one with `mmr train-reranker TABLE --out DIR`"


def _write_atomic(target: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same directory + os.replace: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_reranker(
    model: CrossAttentionScorer,
    out_dir: str | os.PathLike[str],
    *,
    encoder_fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` (created if needed) and return the directory.

    ``encoder_fingerprint`` identifies the encoder the reranker was trained on; ``extra`` is any
    JSON-serialisable metadata (training metrics, data source, ...). Weights are written before
    ``reranker.json``, each atomically, so a directory with a json always has its weights.
    """
    if not isinstance(encoder_fingerprint, str) or not encoder_fingerprint:
        raise InputError(f"encoder_fingerprint must be a non-empty string, got {encoder_fingerprint!r}")
    meta = {
        "format": RERANKER_FORMAT,
        "config": model.config.to_dict(),
        "encoder_fingerprint": encoder_fingerprint,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise InputError(f"reranker checkpoint extra metadata must be JSON-serialisable: {e}") from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _write_atomic(
        out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": RERANKER_FORMAT})
    )
    _write_atomic(out / META_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def load_reranker(
    path: str | os.PathLike[str],
    *,
    expected_encoder_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CrossAttentionScorer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_reranker`; returns ``(model in eval mode, meta)``.

    ``path`` is the checkpoint directory or a file inside it (``reranker.json``). ``meta`` is the
    parsed ``reranker.json``. With ``expected_encoder_fingerprint`` a reranker trained on another
    encoder raises :class:`IncompatibleError` before any weights are read.

    Raises:
        InputError: the path does not exist or is not a checkpoint file.
        ModelLoadError: reranker.json missing/invalid/wrong format, weights missing or mismatched.
        IncompatibleError: the encoder fingerprint differs from the expected one.
    """
    ckpt = Path(path)
    if not ckpt.exists():
        raise InputError(
            f"no reranker checkpoint at {str(ckpt)!r}: the path does not exist; {_TRAIN_HINT}"
        )
    if ckpt.is_file():
        if ckpt.name not in (META_FILE, WEIGHTS_FILE):
            raise InputError(
                f"{str(ckpt)!r} is not a reranker checkpoint: pass the directory written by "
                f"`mmr train-reranker` (it holds {META_FILE} and {WEIGHTS_FILE})"
            )
        ckpt = ckpt.parent

    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise ModelLoadError(
            f"{str(ckpt)!r} is not a reranker checkpoint: {META_FILE} is missing; {_TRAIN_HINT}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"{str(meta_path)!r} is not valid JSON ({e}); the checkpoint is damaged: restore it or "
            f"{_TRAIN_HINT}"
        ) from e
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{str(meta_path)!r} must hold a JSON object, got {type(meta).__name__}")

    fmt = meta.get("format")
    if fmt != RERANKER_FORMAT:
        if isinstance(fmt, str) and fmt.startswith("mm_retrieval.reranker/"):
            raise ModelLoadError(
                f"{str(meta_path)!r} has format {fmt!r}; this version of mm_retrieval reads "
                f"{RERANKER_FORMAT!r}. Use the mm_retrieval version that wrote it, or {_TRAIN_HINT}"
            )
        raise ModelLoadError(
            f"{str(meta_path)!r} is not a reranker checkpoint "
            f"(format {fmt!r}, expected {RERANKER_FORMAT!r})"
        )
    config_dict = meta.get("config")
    if not isinstance(config_dict, dict):
        raise ModelLoadError(f"{str(meta_path)!r} has no \"config\" object")
    try:
        config = RerankerConfig.from_dict(config_dict)
    except (ConfigError, TypeError) as e:
        raise ModelLoadError(f"{str(meta_path)!r} has an invalid config: {e}") from e
    fingerprint = meta.get("encoder_fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ModelLoadError(f"{str(meta_path)!r} has no \"encoder_fingerprint\" string")

    if expected_encoder_fingerprint is not None and fingerprint != expected_encoder_fingerprint:
        raise IncompatibleError(
            f"the reranker at {str(ckpt)!r} was trained on encoder {fingerprint!r}, but the encoder in "
            f"use is {expected_encoder_fingerprint!r}. A reranker must be used with the encoder it was "
            f"trained on: switch back to that encoder, or retrain the reranker for this one with "
            f"`mmr train-reranker TABLE --out DIR`"
        )

    weights_path = ckpt / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelLoadError(f"{str(ckpt)!r} has {META_FILE} but no {WEIGHTS_FILE}; {_TRAIN_HINT}")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"cannot read {str(weights_path)!r}: {e}; restore it or {_TRAIN_HINT}"
        ) from e

    model = CrossAttentionScorer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{str(weights_path)!r} does not match the config in {META_FILE}: {e}"
        ) from e
    meta.setdefault("extra", {})
    return model.to(device).eval(), meta
