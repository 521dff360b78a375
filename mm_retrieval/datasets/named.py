"""A generated set whose captions carry information the pixels don't: names and places.

Each image is one simple object (rendered like :mod:`.compositional`); its caption adds an owner
and a place, e.g. "Maria's small red circle, photographed in Lisbon". With 36 possible looks
(size x colour x shape) and ``n`` images, many images look alike and differ only in their
captions, so image-vector search cannot find "the one Kwame photographed in Oslo" while a
search over caption text can. Captions are unique; images are byte-unique and deterministic.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm_retrieval.datasets.compositional import (
    COLOURS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    _write_table,
    render_scene,
)
from mm_retrieval.errors import InputError

log = logging.getLogger(__name__)

NAMES: tuple[str, ...] = (
    "Maria", "Ahmed", "Yuki", "Olu", "Sofia", "Liam",
    "Priya", "Mateo", "Anya", "Kwame", "Elena", "Jonas",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "Lisbon", "Nairobi", "Kyoto", "Lima", "Oslo", "Cairo",
    "Hanoi", "Quebec", "Porto", "Accra", "Seville", "Tbilisi",
)  # fmt: skip
FIELDS: tuple[str, ...] = ("path", "caption", "name", "place", "size", "colour", "shape")

_LOOKS = list(itertools.product(SIZES, COLOURS, SHAPES))
MAX_N = len(_LOOKS) * len(NAMES) * len(PLACES)  # every (look, name, place) once


@dataclass(frozen=True)
class NamedSet:
    """Where :func:`generate_named` wrote the set. ``table``'s ``path`` column is relative to ``root``."""

    root: Path
    table: Path
    n: int


def generate_named(out_dir: str | Path, *, n: int = 300, image_size: int = 64, seed: int = 0) -> NamedSet:
    """Write ``n`` images to ``out_dir/images/*.png`` and the table ``out_dir/all.csv`` with
    columns ``path, caption, name, place, size, colour, shape``. Existing ``images/*.png`` files
    there are replaced."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise InputError(
            f"n must be an integer from 1 to {MAX_N} (a number of images), got {n!r}; pass e.g. n=300"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise InputError(
            f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
            f"got {image_size!r}; pass e.g. image_size=64"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"out_dir {str(root)!r} exists and is not a folder; pass a folder path")
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()

    rng = np.random.default_rng([seed, 7])
    # Sampling (look, name, place) without replacement keeps captions unique while looks repeat.
    picks = rng.choice(MAX_N, size=n, replace=False)
    seen: set[bytes] = set()
    rows = []
    for i, k in enumerate(picks):
        look, rest = divmod(int(k), len(NAMES) * len(PLACES))
        name, place = NAMES[rest // len(PLACES)], PLACES[rest % len(PLACES)]
        size, colour, shape = _LOOKS[look]
        data, _ = render_scene(Scene((SceneObject(size, colour, shape),)), image_size, rng, seen)
        path = f"images/{i:06d}.png"
        (root / path).write_bytes(data)
        caption = f"{name}'s {size} {colour} {shape}, photographed in {place}"
        rows.append({"path": path, "caption": caption, "name": name, "place": place,
                     "size": size, "colour": colour, "shape": shape})  # fmt: skip

    table = root / "all.csv"
    _write_table(table, rows, FIELDS)
    log.info("wrote named set to %s: %d images (%dpx)", root, n, image_size)
    return NamedSet(root=root, table=table, n=n)
