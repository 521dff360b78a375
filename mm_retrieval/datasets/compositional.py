"""A generated compositional image-caption set with hard contrasts and a held-out split.

Every image shows two (optionally three) flat shapes on a light, slightly noisy background;
its caption binds each object's size, colour and shape and the spatial relation between them::

    a small red circle left of a large blue square
    a small red circle left of a large blue square, and a large green triangle above them

Why this set: a pooled dual encoder (CLIP) behaves much like a bag of words, so it cannot tell
"a red circle left of a blue square" from "a blue circle left of a red square". A reranker that
attends across text and image tokens can. The set makes that difference measurable:

* **Contrast groups.** Scenes come in groups of four that share one multiset of caption words
  but bind them differently: the ``base`` scene (A rel B); ``colour_swap`` (A and B exchange
  colours); ``relation_flip`` (B is drawn where A was and is named first, with the same
  relation word: "B rel A"); and ``swap_flip`` (both). Within a split every caption is unique
  until the split's distinct groups run out (two-object groups: 144, i.e. 576 images, in test;
  576, i.e. 2304 images, in train; three-object groups add more); beyond that, groups repeat
  with fresh renderings.
* **Held-out combinations.** A *combination* is the unordered pair of bindings of two objects
  in one scene, e.g. ``{"red circle", "blue square"}`` (colour+shape; sizes and relations are
  not part of it). The two objects of a scene always differ in colour and in shape. The
  combinations are partitioned into train and test so that no test scene contains a
  combination that any training scene contains; a three-object scene contains three
  combinations (every pair of its objects) and all of them obey the split. The partition keeps
  a combination together with its colour-swapped partner (``{red circle, blue square}`` with
  ``{blue circle, red square}``), so a contrast group never straddles the split. Every colour,
  shape, size and relation word, and every single colour+shape binding, occurs in training;
  only their pairings are new in test. :func:`check_heldout` verifies this on written tables.

Images are deterministic given the arguments (the same seed writes byte-identical files), and
no two images have identical bytes: downstream code uses content hashes as ids.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import itertools
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mm_retrieval.errors import InputError

log = logging.getLogger(__name__)

# Palette chosen so that any two colours stay far apart (RGB distance > 90) even after the
# per-object shade jitter below, and all stand out from the light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (50, 160, 70),
    "blue": (45, 90, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 180),
    "orange": (240, 135, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
VARIANTS: tuple[str, ...] = ("base", "colour_swap", "relation_flip", "swap_flip")

BACKGROUND = (238, 238, 232)
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
HELDOUT_CLASSES = 9  # of the 45 colour-swap classes (90 combinations), about 20 %

_EXTENT = {"small": 0.19, "large": 0.33}  # object width/height as a fraction of the image side
_EXTENT_JITTER = 0.02  # keeps small and large at least ~1.5x apart
_MARGIN = 0.04  # free border, fraction of the side
_GAP = 0.06  # minimum free space between two objects, fraction of the side
_PERP_JITTER = 0.10  # off-axis wobble; kept below the on-axis separation so relations stay clear
_SHADE_JITTER = 12
_NOISE = 3  # +-noise per channel; makes every file byte-unique at no visible cost
_SUPERSAMPLE = 4  # draw large, then box-downsample: anti-aliased edges, exact colours inside

FIELDS: tuple[str, ...] = (
    "path", "caption", "split", "group", "variant", "n_objects", "combination",
    "size_1", "colour_1", "shape_1", "relation", "size_2", "colour_2", "shape_2",
    "relation_3", "size_3", "colour_3", "shape_3",
    "x_1", "y_1", "extent_1", "x_2", "y_2", "extent_2", "x_3", "y_3", "extent_3",
)  # fmt: skip


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One object: a size, a colour and a shape word."""

    size: str
    colour: str
    shape: str

    @property
    def binding(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def phrase(self) -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        return f"{_article(words)} {words}"


@dataclass(frozen=True)
class Scene:
    """What a caption says: objects 1 and 2 with ``relation`` (object 1 relative to object 2),
    and optionally object 3 placed ``relation_3`` ("above"/"below") both of them."""

    objects: tuple[SceneObject, ...]
    relation: str = ""
    relation_3: str = ""

    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase()
        a, b = self.objects[:2]
        text = f"{a.phrase()} {self.relation} {b.phrase()}"
        if len(self.objects) == 3:
            text += f", and {self.objects[2].phrase()} {self.relation_3} them"
        return text


@dataclass(frozen=True)
class PlacedObject:
    """An object as drawn: centre and side length in pixels, and its exact fill colour."""

    obj: SceneObject
    cx: float
    cy: float
    extent: float
    rgb: tuple[int, int, int]

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" else "a"


def colour_swap(scene: Scene) -> Scene:
    """Objects 1 and 2 exchange colours; everything else stays."""
    a, b = scene.objects[:2]
    swapped = (SceneObject(a.size, b.colour, a.shape), SceneObject(b.size, a.colour, b.shape))
    return Scene(swapped + scene.objects[2:], scene.relation, scene.relation_3)


def relation_flip(scene: Scene) -> Scene:
    """Objects 1 and 2 trade places and caption order; the relation word stays."""
    a, b = scene.objects[:2]
    return Scene((b, a) + scene.objects[2:], scene.relation, scene.relation_3)


def contrast_group(base: Scene) -> tuple[Scene, ...]:
    """The four scenes of ``base``'s contrast group, in :data:`VARIANTS` order."""
    swapped = colour_swap(base)
    return (base, swapped, relation_flip(base), relation_flip(swapped))


# --------------------------------------------------------------------------- layout + render


def layout(scene: Scene, image_size: int, rng: np.random.Generator) -> list[PlacedObject]:
    """Place and colour the scene's objects so that the caption is true: along the relation's
    axis the objects' boxes are separated by at least a gap, and the off-axis offset is smaller
    than the on-axis distance. Objects never overlap and stay inside the image."""
    s = float(image_size)
    m, g = _MARGIN * s, max(2.0, _GAP * s)
    ext = [s * (_EXTENT[o.size] + rng.uniform(-_EXTENT_JITTER, _EXTENT_JITTER)) for o in scene.objects]
    n = len(scene.objects)

    if n == 1:  # single object, near the centre (used by the named set)
        cx, cy = (_off_axis(ext[0], m, s - m, rng, wobble=0.15 * s) for _ in range(2))
        centres = [(cx, cy)]
    elif n == 2:
        full = (m, s - m)
        centres = _place_pair(scene.relation, ext[0], ext[1], full, full, g, _PERP_JITTER * s, rng)
    elif n == 3:
        if scene.relation not in ("left of", "right of") or scene.relation_3 not in ("above", "below"):
            raise ValueError("three-object scenes need a horizontal relation and relation_3 above/below")
        mid = s / 2
        third_band, pair_band = (m, mid - g / 2), (mid + g / 2, s - m)
        if scene.relation_3 == "below":
            third_band, pair_band = pair_band, third_band
        wobble = _PERP_JITTER * s
        centres = _place_pair(scene.relation, ext[0], ext[1], (m, s - m), pair_band, g, wobble, rng)
        x3 = _off_axis(ext[2], m, s - m, rng, wobble=wobble)
        centres.append((x3, _off_axis(ext[2], *third_band, rng, wobble=wobble)))
    else:
        raise ValueError(f"scenes have 1 to 3 objects, got {n}")

    placed = []
    for obj, e, (cx, cy) in zip(scene.objects, ext, centres):
        shade = np.array(COLOURS[obj.colour]) + rng.integers(-_SHADE_JITTER, _SHADE_JITTER + 1, 3)
        rgb = tuple(int(v) for v in np.clip(shade, 0, 255))
        placed.append(PlacedObject(obj, float(cx), float(cy), float(e), rgb))  # type: ignore[arg-type]
    return placed


def _place_pair(relation, e1, e2, x_band, y_band, gap, wobble, rng) -> list[tuple[float, float]]:
    """Centres for objects 1 and 2 inside ``x_band`` x ``y_band`` (each a ``(lo, hi)`` range)."""
    horizontal = relation in ("left of", "right of")
    first_is_1 = relation in ("left of", "above")  # object 1 comes first (left/top) on the axis
    (lo, hi), perp_band = (x_band, y_band) if horizontal else (y_band, x_band)
    ea, eb = (e1, e2) if first_is_1 else (e2, e1)
    slack = (hi - lo) - (ea + eb + gap)
    if slack < 0:
        raise ValueError("objects do not fit; image too small")
    before, between, _ = rng.dirichlet((1.0, 1.0, 1.0)) * slack
    ca = lo + before + ea / 2
    cb = lo + before + ea + gap + between + eb / 2
    c1, c2 = (ca, cb) if first_is_1 else (cb, ca)
    p1 = _off_axis(e1, *perp_band, rng, wobble=wobble)
    p2 = _off_axis(e2, *perp_band, rng, wobble=wobble)
    return [(c1, p1), (c2, p2)] if horizontal else [(p1, c1), (p2, c2)]


def _off_axis(e: float, lo: float, hi: float, rng: np.random.Generator, *, wobble: float) -> float:
    """A coordinate within ``wobble`` of the band's middle that keeps the object inside the band."""
    centre = (lo + hi) / 2
    return float(np.clip(centre + rng.uniform(-wobble, wobble), lo + e / 2, hi - e / 2))


def render(placed: Sequence[PlacedObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the placed objects; returns an ``(H, W, 3)`` uint8 array with background noise."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * k, image_size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for p in placed:
        _draw_object(draw, p, k, p.rgb)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def coverage(placed: Sequence[PlacedObject], image_size: int) -> np.ndarray:
    """The share of each pixel that each object covers: ``(n_objects, H, W)`` float32 in [0, 1],
    drawn with :func:`render`'s geometry and supersampling (so it matches the image's edges).
    Objects never overlap, so the shares of one pixel sum to at most 1."""
    k = _SUPERSAMPLE
    out = np.zeros((len(placed), image_size, image_size), dtype=np.float32)
    for i, p in enumerate(placed):
        mask = Image.new("L", (image_size * k, image_size * k), 0)
        _draw_object(ImageDraw.Draw(mask), p, k, 255)
        small = mask.resize((image_size, image_size), Image.Resampling.BOX)
        out[i] = np.asarray(small, dtype=np.float32) / 255.0
    return out


def _draw_object(draw: ImageDraw.ImageDraw, p: PlacedObject, k: int, fill) -> None:
    """Draw ``p`` scaled by ``k`` (the supersampling factor) in ``fill``."""
    x0, y0, x1, y1 = (v * k for v in p.box)
    if p.obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif p.obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif p.obj.shape == "triangle":  # apex up; the box centre lies inside it
        draw.polygon([(p.cx * k, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {p.obj.shape!r}")


def _encode_unique(pixels: np.ndarray, rng: np.random.Generator, seen: set[bytes]) -> bytes:
    """PNG bytes of ``pixels`` plus fresh noise, re-drawing the noise on the (astronomically
    rare) chance that the bytes equal an earlier image's."""
    while True:
        noise = rng.integers(-_NOISE, _NOISE + 1, pixels.shape)
        noisy = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy, "RGB").save(buf, format="PNG", compress_level=1)  # noise barely compresses
        data = buf.getvalue()
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            return data


def render_scene(
    scene: Scene, image_size: int, rng: np.random.Generator, seen: set[bytes] | None = None
) -> tuple[bytes, list[PlacedObject]]:
    """Lay out, render and PNG-encode ``scene``. Returns ``(png_bytes, placed_objects)``.
    ``seen`` holds the sha256 digests of earlier images; the new image's is added."""
    placed = layout(scene, image_size, rng)
    data = _encode_unique(render(placed, image_size, rng), rng, set() if seen is None else seen)
    return data, placed


# --------------------------------------------------------------------------- held-out split

Binding = tuple[str, str]  # (colour, shape)
ClassKey = tuple[str, str, str, str]  # (colour_a, colour_b, shape_a, shape_b), each pair sorted


def combination(b1: Binding, b2: Binding) -> str:
    """The canonical name of an unordered pair of bindings, e.g. ``"blue square+red circle"``."""
    return "+".join(sorted(f"{c} {s}" for c, s in (b1, b2)))


def _class_key(b1: Binding, b2: Binding) -> ClassKey:
    (c1, s1), (c2, s2) = b1, b2
    return (*sorted((c1, c2)), *sorted((s1, s2)))  # type: ignore[return-value]


def _all_classes() -> list[ClassKey]:
    colour_pairs = itertools.combinations(sorted(COLOURS), 2)
    return [(*cp, *sp) for cp in colour_pairs for sp in itertools.combinations(sorted(SHAPES), 2)]


def _scene_class_keys(scene: Scene) -> set[ClassKey]:
    """Class keys of every object pair in the scene and in its colour-swapped twin (the flips
    have the same pairs), i.e. of every combination its contrast group contains."""
    keys = set()
    for s in (scene, colour_swap(scene)):
        for a, b in itertools.combinations(s.objects, 2):
            keys.add(_class_key(a.binding, b.binding))
    return keys


def heldout_classes(seed: int) -> frozenset[ClassKey]:
    """The colour-swap classes (each holds two combinations) reserved for the test split.

    Includes the five classes a three-object group needs, so the test split can hold
    three-object scenes; every binding keeps at least one training combination.
    """
    rng = np.random.default_rng([seed, 0])
    classes = _all_classes()
    colours = list(COLOURS)
    for _ in range(100):
        c1, c2, c3 = (colours[i] for i in rng.choice(len(colours), 3, replace=False))
        s1, s2, s3 = (SHAPES[i] for i in rng.permutation(len(SHAPES)))
        triple = Scene(tuple(SceneObject(SIZES[0], c, s) for c, s in ((c1, s1), (c2, s2), (c3, s3))))
        held = _scene_class_keys(triple)
        rest = [k for k in classes if k not in held]
        held |= {rest[i] for i in rng.choice(len(rest), HELDOUT_CLASSES - len(held), replace=False)}
        train_bindings = {(c, s) for k in classes if k not in held for c in k[:2] for s in k[2:]}
        if len(train_bindings) == len(COLOURS) * len(SHAPES):
            return frozenset(held)
    raise RuntimeError("could not find a held-out partition; the vocabulary is too small")


@functools.lru_cache(maxsize=8)
def _orbits(classes: frozenset[ClassKey], n_objects: int) -> tuple[tuple[Scene, ...], ...]:
    """Every contrast group of ``n_objects``-object scenes whose combinations all lie in
    ``classes``, each as its four scenes in :data:`VARIANTS` order, in a deterministic order."""
    all_bindings = itertools.product(sorted(COLOURS), sorted(SHAPES))
    if n_objects == 2:
        relations = [(r, "") for r in RELATIONS]
    else:  # the third object takes its own row, so objects 1 and 2 relate horizontally
        relations = list(itertools.product(("left of", "right of"), ("above", "below")))
    orbits = []
    for bs in itertools.permutations(all_bindings, n_objects):
        if len({c for c, _ in bs}) < n_objects or len({s for _, s in bs}) < n_objects:
            continue  # objects differ in colour and in shape
        if not _scene_class_keys(Scene(tuple(SceneObject(SIZES[0], *b) for b in bs))) <= classes:
            continue
        (c1, s1), (c2, s2) = bs[:2]
        for sizes in itertools.product(SIZES, repeat=n_objects):
            z1, z2 = sizes[:2]
            # Emit each group once: from the member whose (object 1, object 2) is smallest.
            me = ((c1, s1), (c2, s2), z1, z2)
            twins = (((c2, s1), (c1, s2), z1, z2), ((c2, s2), (c1, s1), z2, z1), ((c1, s2), (c2, s1), z2, z1))
            if any(t < me for t in twins):
                continue
            objects = tuple(SceneObject(z, *b) for z, b in zip(sizes, bs))
            orbits.extend(contrast_group(Scene(objects, rel, rel_3)) for rel, rel_3 in relations)
    return tuple(orbits)


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class CompositionalSet:
    """Where :func:`generate_compositional` wrote the set, and how many images each split has.

    The tables are CSV files whose ``path`` column is relative to the table's folder (``root``).
    """

    root: Path
    train_table: Path
    test_table: Path
    all_table: Path
    n_train: int
    n_test: int


def generate_compositional(
    out_dir: str | Path,
    *,
    n_train: int = 2000,
    n_test: int = 500,
    image_size: int = 64,
    seed: int = 0,
    three_object_fraction: float = 0.0,
) -> CompositionalSet:
    """Generate the compositional set under ``out_dir`` (see the module docstring).

    Writes ``images/train/*.png``, ``images/test/*.png`` and the tables ``train.csv``,
    ``test.csv`` and ``all.csv`` (train rows, then test rows). ``n_train``/``n_test`` count images
    and are rounded up to whole contrast groups of four; the returned set reports the actual
    counts. ``three_object_fraction`` is the share of contrast groups with a third object.
    The test split does not depend on ``n_train`` (and vice versa). An existing set in
    ``out_dir`` is replaced; other files there are left alone.
    """
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise InputError(
            f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
            f"got {image_size!r}; pass e.g. image_size=64"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    if not isinstance(three_object_fraction, (int, float)) or not 0.0 <= three_object_fraction <= 1.0:
        raise InputError(
            f"three_object_fraction must be a number from 0 to 1, got {three_object_fraction!r}; "
            f"pass e.g. three_object_fraction=0.0"
        )
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"out_dir {str(root)!r} exists and is not a folder; pass a folder path")

    started = time.perf_counter()
    for split in ("train", "test"):  # stale images from a larger earlier run would linger
        shutil.rmtree(root / "images" / split, ignore_errors=True)
        (root / "images" / split).mkdir(parents=True)

    held = heldout_classes(seed)
    train_classes = frozenset(_all_classes()) - held
    seen: set[bytes] = set()
    rows = {}
    # Each split draws from its own random streams, so neither depends on the other's size.
    splits = (("train", n_train, train_classes), ("test", n_test, held))
    for stream, (split, n, classes) in enumerate(splits, start=1):
        n_groups = math.ceil(n / len(VARIANTS))
        rows[split] = _generate_split(
            root, split, stream, n_groups, classes, image_size, seed, three_object_fraction, seen
        )

    dataset = CompositionalSet(
        root=root,
        train_table=root / "train.csv",
        test_table=root / "test.csv",
        all_table=root / "all.csv",
        n_train=len(rows["train"]),
        n_test=len(rows["test"]),
    )
    _write_table(dataset.train_table, rows["train"])
    _write_table(dataset.test_table, rows["test"])
    _write_table(dataset.all_table, rows["train"] + rows["test"])
    log.info(
        "wrote compositional set to %s: %d train + %d test images (%dpx) in %.1fs",
        root, dataset.n_train, dataset.n_test, image_size, time.perf_counter() - started,
    )  # fmt: skip
    return dataset


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(
            f"{name} must be a positive integer (a number of images), got {value!r}; pass e.g. {name}=100"
        )


def _generate_split(root, split, stream, n_groups, classes, image_size, seed, three_fraction, seen):
    rng = np.random.default_rng([seed, stream])
    # Groups are drawn without replacement from a shuffled list, so captions stay unique
    # within the split until the list is used up.
    orbits = {k: _orbits(classes, k) if k == 2 or three_fraction > 0 else [] for k in (2, 3)}
    orbits = {k: [o[i] for i in rng.permutation(len(o))] for k, o in orbits.items()}
    used = {2: 0, 3: 0}

    rows: list[dict] = []
    for g in range(n_groups):
        grng = np.random.default_rng([seed, stream, g])  # per group: stable under n changes
        k = 3 if orbits[3] and grng.random() < three_fraction else 2
        orbit = orbits[k][used[k] % len(orbits[k])]
        used[k] += 1
        base = orbit[grng.integers(len(orbit))]
        for variant, scene in zip(VARIANTS, contrast_group(base)):
            rel_path = f"images/{split}/{len(rows):06d}.png"
            data, placed = render_scene(scene, image_size, grng, seen)
            (root / rel_path).write_bytes(data)
            rows.append(_row(rel_path, split, f"{split}-{g:05d}", variant, scene, placed))
    for k, n_used in used.items():
        if n_used > len(orbits[k]):
            log.info(
                "%s split: %d %d-object groups but only %d distinct ones; captions repeat",
                split, n_used, k, len(orbits[k]),
            )  # fmt: skip
    return rows


def _row(path: str, split: str, group: str, variant: str, scene: Scene, placed: list[PlacedObject]) -> dict:
    pairs = {combination(a.binding, b.binding) for a, b in itertools.combinations(scene.objects, 2)}
    row = {
        "path": path, "caption": scene.caption(), "split": split, "group": group, "variant": variant,
        "n_objects": len(scene.objects), "combination": ";".join(sorted(pairs)),
        "relation": scene.relation, "relation_3": scene.relation_3,
    }  # fmt: skip
    for i in range(1, 4):
        p = placed[i - 1] if i <= len(placed) else None
        row[f"size_{i}"] = p.obj.size if p else ""
        row[f"colour_{i}"] = p.obj.colour if p else ""
        row[f"shape_{i}"] = p.obj.shape if p else ""
        row[f"x_{i}"] = round(p.cx, 2) if p else ""
        row[f"y_{i}"] = round(p.cy, 2) if p else ""
        row[f"extent_{i}"] = round(p.extent, 2) if p else ""
    return row


def _write_table(path: Path, rows: list[dict], fields: Sequence[str] = FIELDS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def read_table(path: str | Path) -> list[dict[str, str]]:
    """The rows of a table written by this module, as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class SplitReport:
    """Result of :func:`check_heldout`. ``ok`` is true when the split is clean."""

    shared_combinations: frozenset[str]  # combinations present in both train and test
    words_missing_from_train: frozenset[str]  # colour/shape/size/relation words only in test
    bindings_missing_from_train: frozenset[str]  # "colour shape" bindings only in test

    @property
    def ok(self) -> bool:
        return not (
            self.shared_combinations or self.words_missing_from_train or self.bindings_missing_from_train
        )


def row_combinations(row: dict[str, str]) -> set[str]:
    """Every combination (unordered pair of colour+shape bindings) a table row's scene holds,
    recomputed from its colour/shape columns."""
    bindings = [(row[f"colour_{i}"], row[f"shape_{i}"]) for i in range(1, 4) if row.get(f"colour_{i}")]
    return {combination(a, b) for a, b in itertools.combinations(bindings, 2)}


def placed_objects(row: dict[str, str]) -> list[PlacedObject]:
    """A table row's objects as drawn (centre, side, shape; the fill is the palette's nominal
    colour, not the jittered shade), e.g. for :func:`coverage`."""
    placed = []
    for i in range(1, 4):
        if not row.get(f"shape_{i}"):
            break
        obj = SceneObject(row[f"size_{i}"], row[f"colour_{i}"], row[f"shape_{i}"])
        x, y, e = (float(row[f"{k}_{i}"]) for k in ("x", "y", "extent"))
        placed.append(PlacedObject(obj, x, y, e, COLOURS[obj.colour]))
    return placed


def _row_words(row: dict[str, str]) -> set[str]:
    cols = [f"{k}_{i}" for k in ("size", "colour", "shape") for i in range(1, 4)]
    return {row[c] for c in (*cols, "relation", "relation_3") if row.get(c)}


def _row_bindings(row: dict[str, str]) -> set[str]:
    return {f"{row[f'colour_{i}']} {row[f'shape_{i}']}" for i in range(1, 4) if row.get(f"colour_{i}")}


def check_heldout(train_table: str | Path, test_table: str | Path) -> SplitReport:
    """Check that no test combination occurs in training, while every vocabulary word and
    every single binding used in test does."""
    train, test = read_table(train_table), read_table(test_table)

    def union(rows, fn):
        return set().union(*(fn(r) for r in rows)) if rows else set()

    return SplitReport(
        shared_combinations=frozenset(union(train, row_combinations) & union(test, row_combinations)),
        words_missing_from_train=frozenset(union(test, _row_words) - union(train, _row_words)),
        bindings_missing_from_train=frozenset(union(test, _row_bindings) - union(train, _row_bindings)),
    )


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mm_retrieval.datasets.compositional OUT_DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mm_retrieval.datasets.compositional",
        description="Generate the compositional image-caption set (train/test with held-out combinations).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write images/ and the CSV tables into")
    parser.add_argument("--n-train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--n-test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--three-object-fraction", type=float, default=0.0, help="share of groups with 3 objects (default 0)"
    )
    args = parser.parse_args(argv)
    try:
        ds = generate_compositional(
            args.out_dir, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
            seed=args.seed, three_object_fraction=args.three_object_fraction,
        )  # fmt: skip
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {ds.n_train} train + {ds.n_test} test images and train/test/all.csv to {ds.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
