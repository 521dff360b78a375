"""The resumable training state, ``OUT/_train_state.pt``.

Written after every epoch: the model, optimiser, best state, history and RNG states (plain tensors
and containers, read back with ``weights_only=True``) plus a *signature* of the run (table, encoder,
settings) that a resumed run must match.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mm_retrieval.errors import IncompatibleError, ModelLoadError

STATE_FILE = "_train_state.pt"
STATE_FORMAT = "mm_retrieval.reranker-train-state/1"


def write_state(path: Path, state: dict[str, Any], signature: dict[str, Any]) -> None:
    """torch.save via a temp file + os.replace: an interruption never leaves half a state file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": STATE_FORMAT, "signature": signature, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path) -> dict[str, Any]:
    """Load ``_train_state.pt``: tensors and plain containers only (``weights_only=True``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ModelLoadError(
            f"cannot read the training state {path} ({type(e).__name__}: {e}); delete it and "
            "train again without resume"
        ) from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ModelLoadError(f"{path} is not a reranker training state ({STATE_FORMAT}); delete it "
                             "and train again without resume")
    return state


def check_signature(path: Path, state: dict[str, Any], signature: dict[str, Any]) -> None:
    """The state must come from the same table, encoder and settings (those known so far)."""
    saved = state.get("signature", {})
    diff = sorted(k for k in signature if saved.get(k) != signature[k])
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {signature[k]!r}" for k in diff)
        raise IncompatibleError(
            f"cannot resume from {path}: it belongs to a different run ({details}). Use the same "
            "table, encoder and settings, or train again without resume"
        )
