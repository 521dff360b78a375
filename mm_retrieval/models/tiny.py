"""Tiny open_clip architectures shipped with mm_retrieval.

They make tests fast and let the offline demo train a first stage on CPU in minutes. They are
plain open_clip model configs (JSON), registered with ``open_clip.add_model_config`` exactly as a
user would register their own.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_tiny_configs() -> list[str]:
    """Register ``mmr-tiny`` and ``mmr-small`` with open_clip (idempotent); return their names."""
    global _registered
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return names
