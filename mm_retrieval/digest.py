"""Weight files: their identity (cheap enough for multi-GB checkpoints) and a safe first load."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ModelLoadError


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's size and its first and last MiB: it changes when the weights do,
    without reading gigabytes on every start. Collections and token caches are keyed by it."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def check_tensor_checkpoint(path: Path) -> None:
    """Refuse a pickle-based weights file that is not a plain tensor checkpoint: load it with
    ``torch.load(weights_only=True)`` (which never runs code from the file) before a library that
    might retry without ``weights_only`` does."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load weights file {path}: only tensor checkpoints are accepted (.safetensors, or a "
            f".pt/.pth/.bin state dict loadable with torch.load(weights_only=True)); {type(e).__name__}: {e}"
        ) from e
