"""Small distinct images for tests and examples: no data set, no download."""

from __future__ import annotations

import random
from pathlib import Path

# Eight colours far apart, so that even a random tiny encoder tells the images apart.
COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}


def make_image(path: Path, color: tuple[int, int, int], *, size: tuple[int, int] = (72, 56), seed: int = 0) -> Path:
    """Write a solid ``color`` image with a few seeded noise pixels (so every file's bytes are
    distinct) to ``path``, creating its folder; the format follows the suffix. Returns ``path``."""
    from PIL import Image

    rng = random.Random(seed)
    im = Image.new("RGB", size, color)
    px = im.load()
    for _ in range(12):
        px[rng.randrange(size[0]), rng.randrange(size[1])] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
