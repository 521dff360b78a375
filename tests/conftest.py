"""Shared fixtures. Tests never reach the network: the model hub is forced offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

TINY = {"model": "mmr-tiny", "pretrained": "none"}


def make_image(path: Path, color: tuple[int, int, int], size=(72, 56), seed: int = 0, fmt: str | None = None) -> Path:
    """A small distinct image: a solid colour with a few seeded noise pixels (unique bytes)."""
    from PIL import Image

    rng = random.Random(seed)
    im = Image.new("RGB", size, color)
    px = im.load()
    for _ in range(12):
        px[rng.randrange(size[0]), rng.randrange(size[1])] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """8 distinct images in a folder tree (one nested), plus nothing else."""
    root = tmp_path / "photos"
    for i, (name, rgb) in enumerate(COLORS.items()):
        sub = root / "nested" if i % 3 == 0 else root
        make_image(sub / f"{name}.png", rgb, seed=i)
    return root


@pytest.fixture
def tiny_pipeline(tmp_path: Path):
    """A pipeline on a fresh Milvus Lite db with the tiny seeded model (no decoding workers)."""
    from mm_retrieval import Pipeline

    return Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})
