"""Identity of weight files, cheap enough for multi-GB checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


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
