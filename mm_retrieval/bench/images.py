"""Photo-like test images for the indexing benchmark.

Decoding is the cost the indexing pipeline has to hide behind the forward pass, so the images
must cost what photos cost to decode: JPEG (most) and PNG (some), 256-640 px a side, with smooth
gradients, a few shapes and sensor-like noise (noise is what makes JPEG files large and slow to
decode; flat synthetic images decode unrealistically fast). Every file has unique bytes, since
the pipeline keys items by content hash and would store duplicates once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PNG_SHARE = 0.2  # one file in five is PNG, the rest JPEG (quality 90)


def make_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 photo-like array: two-axis gradient, a few ellipses, Gaussian noise."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c0, cx, cy = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    img = c0 * 0.5 + cx * x * 0.5 + cy * y * 0.5  # [H, W, 3]
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):
        cxp, cyp = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        inside = ((xx - cxp) / rx) ** 2 + ((yy - cyp) / ry) ** 2 <= 1.0
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_images(folder: str | Path, n: int, *, min_side: int = 256, max_side: int = 640, seed: int = 0) -> list[Path]:
    """Write ``n`` images into ``folder`` (reusing a complete earlier set); returns their paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / f".complete-{n}-{min_side}-{max_side}-{seed}"
    rng = np.random.default_rng(seed)
    names = [f"img{i:05d}.{'png' if rng.random() < PNG_SHARE else 'jpg'}" for i in range(n)]
    paths = [folder / name for name in names]
    if stamp.exists():
        return paths
    for old in folder.iterdir():  # a different earlier set: don't let it leak into this one
        if old.is_file():
            old.unlink()
    for i, path in enumerate(paths):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        im = Image.fromarray(make_image(rng, w, h))
        if path.suffix == ".png":
            im.save(path, format="PNG", compress_level=6)
        else:
            im.save(path, format="JPEG", quality=90)
        if (i + 1) % 500 == 0:
            log.info("bench: generated %d/%d images", i + 1, n)
    stamp.touch()
    return paths
