"""Tests for the generated image-caption sets (mm_retrieval.datasets)."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_retrieval.datasets import (
    CompositionalSet,
    NamedSet,
    check_heldout,
    generate_compositional,
    generate_named,
)
from mm_retrieval.datasets import compositional as comp
from mm_retrieval.errors import InputError

PALETTE = np.array(list(comp.COLOURS.values()), dtype=float)
PALETTE_NAMES = list(comp.COLOURS)


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cset(tmp_path_factory) -> CompositionalSet:
    out = tmp_path_factory.mktemp("compositional")
    return generate_compositional(out, n_train=160, n_test=64, seed=3, three_object_fraction=0.3)


@pytest.fixture(scope="module")
def rows(cset) -> list[dict[str, str]]:
    return read(cset.all_table)


# --------------------------------------------------------------------------- tables and files


def test_tables_have_documented_columns_and_paths_resolve(cset, rows):
    assert cset.n_train == 160 and cset.n_test == 64
    train, test = read(cset.train_table), read(cset.test_table)
    assert len(train) == cset.n_train and len(test) == cset.n_test
    assert rows == train + test
    for table in (cset.train_table, cset.test_table, cset.all_table):
        with open(table, newline="") as f:
            assert tuple(next(csv.reader(f))) == comp.FIELDS
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    for r in rows:
        rel = Path(r["path"])
        assert not rel.is_absolute() and rel.parts[:2] == ("images", r["split"])
        assert (cset.all_table.parent / rel).is_file()
    assert {r["n_objects"] for r in rows} == {"2", "3"}
    images = sorted((cset.root / "images").rglob("*.png"))
    assert len(images) == len(rows)
    with Image.open(images[0]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)


def test_counts_round_up_to_whole_contrast_groups(tmp_path):
    ds = generate_compositional(tmp_path, n_train=5, n_test=1)
    assert (ds.n_train, ds.n_test) == (8, 4)
    assert len(read(ds.train_table)) == 8 and len(read(ds.test_table)) == 4


def test_every_image_is_byte_unique(cset, rows):
    digests = {hashlib.sha256((cset.root / r["path"]).read_bytes()).hexdigest() for r in rows}
    assert len(digests) == len(rows)


def test_same_seed_gives_identical_bytes_and_rerun_overwrites(tmp_path):
    args = dict(n_train=12, n_test=8, seed=5, three_object_fraction=0.5)
    a = generate_compositional(tmp_path / "a", **args)
    generate_compositional(tmp_path / "b", n_train=24, n_test=12)  # a different, larger set first ...
    generate_compositional(tmp_path / "b", **args)  # ... then overwritten
    assert tree_bytes(a.root) == tree_bytes(tmp_path / "b")
    other = generate_compositional(tmp_path / "c", **{**args, "seed": 6})
    assert tree_bytes(other.root) != tree_bytes(a.root)


def test_test_split_does_not_depend_on_train_size(tmp_path):
    small = generate_compositional(tmp_path / "s", n_train=8, n_test=8)
    large = generate_compositional(tmp_path / "l", n_train=32, n_test=8)
    assert tree_bytes(small.root / "images" / "test") == tree_bytes(large.root / "images" / "test")
    assert small.test_table.read_bytes() == large.test_table.read_bytes()


def test_image_size_is_configurable(tmp_path):
    ds = generate_compositional(tmp_path, n_train=4, n_test=4, image_size=96)
    with Image.open(ds.root / read(ds.test_table)[0]["path"]) as im:
        assert im.size == (96, 96)


# --------------------------------------------------------------------------- held-out split


def test_heldout_combinations_never_occur_in_training(cset):
    report = check_heldout(cset.train_table, cset.test_table)
    assert report.ok, report
    train_combos = set().union(*map(comp.row_combinations, read(cset.train_table)))
    test_combos = set().union(*map(comp.row_combinations, read(cset.test_table)))
    assert test_combos and train_combos.isdisjoint(test_combos)
    # The `combination` column names the same pairs the colour/shape columns give.
    for r in read(cset.all_table):
        assert set(r["combination"].split(";")) == comp.row_combinations(r)


def test_every_word_and_binding_of_the_vocabulary_occurs_in_training(cset):
    train = read(cset.train_table)
    train_words = Counter(w for r in train for w in r["caption"].replace(",", "").split())
    relation_words = [w for rel in comp.RELATIONS for w in rel.split()]
    vocabulary = [*comp.COLOURS, *comp.SHAPES, *comp.SIZES, *relation_words]
    assert all(train_words[w] for w in vocabulary), [w for w in vocabulary if not train_words[w]]
    bindings = {f"{r[f'colour_{i}']} {r[f'shape_{i}']}" for r in train for i in (1, 2, 3) if r[f"colour_{i}"]}
    assert len(bindings) == len(comp.COLOURS) * len(comp.SHAPES)


def test_check_heldout_flags_a_leaked_combination(cset, tmp_path):
    train, test = read(cset.train_table), read(cset.test_table)
    leaked = tmp_path / "train.csv"
    with open(leaked, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=comp.FIELDS)
        writer.writeheader()
        writer.writerows(train + test[:1])
    report = check_heldout(leaked, cset.test_table)
    assert not report.ok
    assert report.shared_combinations >= comp.row_combinations(test[0])


def test_heldout_partition_covers_every_binding_for_many_seeds():
    classes = comp._all_classes()
    assert len(classes) == 45
    for seed in range(10):
        held = comp.heldout_classes(seed)
        assert len(held) == comp.HELDOUT_CLASSES and held <= set(classes)
        train = set(classes) - held
        assert {(c, s) for k in train for c in k[:2] for s in k[2:]} == {
            (c, s) for c in comp.COLOURS for s in comp.SHAPES
        }
        assert comp._orbits(held, 3), "the test split must be able to hold three-object groups"


# --------------------------------------------------------------------------- contrast groups


def _objects(r: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(r[f"size_{i}"], r[f"colour_{i}"], r[f"shape_{i}"]) for i in (1, 2, 3) if r[f"colour_{i}"]]


def test_contrast_groups_hold_the_swapped_and_flipped_twins(rows):
    groups = defaultdict(dict)
    for r in rows:
        groups[r["group"]][r["variant"]] = r
    assert len(groups) == len(rows) // 4
    for members in groups.values():
        assert set(members) == set(comp.VARIANTS)
        base, swap, flip, both = (members[v] for v in comp.VARIANTS)
        # Same bag of words, four different bindings.
        bags = {tuple(sorted(m["caption"].replace(",", "").split())) for m in members.values()}
        assert len(bags) == 1
        assert len({m["caption"] for m in members.values()}) == 4
        assert len({m["split"] for m in members.values()}) == 1
        (z1, c1, s1), (z2, c2, s2), *third = _objects(base)
        assert _objects(swap) == [(z1, c2, s1), (z2, c1, s2), *third]
        assert _objects(flip) == [(z2, c2, s2), (z1, c1, s1), *third]
        assert _objects(both) == [(z2, c1, s2), (z1, c2, s1), *third]
        assert len({(m["relation"], m["relation_3"]) for m in members.values()}) == 1


def test_captions_are_unique_within_a_split_while_groups_last(rows):
    for split in ("train", "test"):
        captions = [r["caption"] for r in rows if r["split"] == split]
        assert len(set(captions)) == len(captions)


def test_caption_grammar():
    words = ("small red circle", "large blue square", "large green triangle")
    a, b, c = (comp.SceneObject(*w.split()) for w in words)
    assert comp.Scene((a, b), "left of").caption() == "a small red circle left of a large blue square"
    assert (
        comp.Scene((a, b, c), "right of", "above").caption()
        == "a small red circle right of a large blue square, and a large green triangle above them"
    )
    assert comp._article("orange circle") == "an" and comp._article("small circle") == "a"


# --------------------------------------------------------------------------- caption truth


def _box(r: dict[str, str], i: int) -> tuple[float, float, float, float]:
    x, y, half = float(r[f"x_{i}"]), float(r[f"y_{i}"]), float(r[f"extent_{i}"]) / 2
    return (x - half, y - half, x + half, y + half)


def _colour_masks(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels that clearly belong to each palette colour (edge blends and background excluded)."""
    dist = np.linalg.norm(pixels[:, :, None, :].astype(float) - PALETTE[None, None], axis=-1)
    nearest = dist.argmin(-1)
    clear = dist.min(-1) < 40
    return {name: clear & (nearest == i) for i, name in enumerate(PALETTE_NAMES)}


def _measure(mask: np.ndarray) -> tuple[float, float, int, int, float]:
    """Centroid, width, height and fill ratio (pixels / bounding box) of a mask."""
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return xs.mean(), ys.mean(), w, h, mask.sum() / (w * h)


def _blob(pixels: np.ndarray, box: tuple[float, float, float, float]) -> tuple[int, int, float]:
    """Width, height and fill ratio of what is drawn around ``box``, edge pixels included."""
    x0, y0 = (max(0, int(np.floor(v)) - 1) for v in box[:2])
    x1, y1 = (int(np.ceil(v)) + 1 for v in box[2:])
    crop = pixels[y0:y1, x0:x1].astype(float)
    _, _, w, h, fill = _measure(np.linalg.norm(crop - comp.BACKGROUND, axis=-1) > 25)
    return w, h, fill


def _shape_of(fill: float) -> str:
    """Square ~1, circle ~pi/4, triangle ~1/2 of the bounding box; reliable from 64 px up."""
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


def _check_truth(root: Path, r: dict[str, str], size: int) -> None:
    with Image.open(root / r["path"]) as im:
        pixels = np.asarray(im.convert("RGB"))
    masks = _colour_masks(pixels)
    objs = _objects(r)
    measured = {}
    for i, (z, colour, shape) in enumerate(objs, start=1):
        cx, cy = float(r[f"x_{i}"]), float(r[f"y_{i}"])
        # The reported centre is painted in the caption's colour ...
        assert masks[colour][int(cy), int(cx)], (r["path"], colour)
        mx, my, *_ = _measure(masks[colour])
        # ... the painted blob is where the metadata says, with the caption's size and shape.
        assert abs(mx - cx) < 0.1 * size and abs(my - cy) < 0.15 * size
        w, h, fill = _blob(pixels, _box(r, i))
        assert (max(w, h) > 0.26 * size + 1) == (z == "large"), (r["path"], z, w, h)
        if size >= 64:  # below that a small circle is a handful of pixels
            assert _shape_of(fill) == shape, (r["path"], shape, fill)
        measured[i] = (mx, my)
    # No other colour is visible.
    assert sum(int(m.sum()) for c, m in masks.items() if c not in {o[1] for o in objs}) == 0
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _box(r, 1), _box(r, 2)
    (x1, y1), (x2, y2) = measured[1], measured[2]
    rel = r["relation"]
    if rel in ("left of", "right of"):
        assert (x1 < x2) == (rel == "left of")
        assert (ax1 < bx0) if rel == "left of" else (bx1 < ax0)  # boxes apart: clearly left/right
        assert abs(x1 - x2) > abs(y1 - y2)
    else:
        assert (y1 < y2) == (rel == "above")
        assert (ay1 < by0) if rel == "above" else (by1 < ay0)
        assert abs(y1 - y2) > abs(x1 - x2)
    if len(objs) == 3:
        _, y3 = measured[3]
        cx0, cy0, cx1, cy1 = _box(r, 3)
        if r["relation_3"] == "above":
            assert y3 < min(y1, y2) and cy1 < min(ay0, by0)
        else:
            assert y3 > max(y1, y2) and cy0 > max(ay1, by1)
    for b in [_box(r, i) for i in range(1, len(objs) + 1)]:
        assert min(b) >= 0 and max(b) <= size


def test_captions_are_true_to_the_pixels(cset, rows):
    for r in rows:
        _check_truth(cset.root, r, 64)


@pytest.mark.parametrize("size", [32, 96])
def test_captions_are_true_at_other_image_sizes(tmp_path, size):
    ds = generate_compositional(tmp_path, n_train=24, n_test=24, image_size=size, three_object_fraction=0.5)
    for r in read(ds.all_table):
        _check_truth(ds.root, r, size)


def test_objects_never_overlap(rows):
    for r in rows:
        n = int(r["n_objects"])
        boxes = [_box(r, i) for i in range(1, n + 1)]
        for i in range(n):
            for j in range(i + 1, n):
                a, b = boxes[i], boxes[j]
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


# --------------------------------------------------------------------------- bad arguments and CLI


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": -3}, "n_test"),
        ({"n_train": "10"}, "n_train"),
        ({"n_train": True}, "n_train"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"three_object_fraction": 1.5}, "three_object_fraction"),
    ],
)
def test_bad_arguments_raise_input_error(tmp_path, kwargs, named):
    with pytest.raises(InputError, match=named):
        generate_compositional(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_raises_input_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="out_dir"):
        generate_compositional(f, n_train=4, n_test=4)
    with pytest.raises(InputError, match="out_dir"):
        generate_named(f, n=4)


def test_cli(tmp_path, capsys):
    argv = [str(tmp_path), "--n-train", "8", "--n-test", "4", "--image-size", "48", "--seed", "2"]
    assert comp.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "8 train + 4 test" in out
    assert len(read(tmp_path / "all.csv")) == 12
    assert comp.main([str(tmp_path), "--n-train", "0"]) == InputError.exit_code
    assert "n_train" in capsys.readouterr().err


# --------------------------------------------------------------------------- named set


def test_named_set(tmp_path):
    ds = generate_named(tmp_path / "a", n=100, seed=1)
    assert isinstance(ds, NamedSet) and ds.n == 100 and ds.table == ds.root / "all.csv"
    named_rows = read(ds.table)
    assert list(named_rows[0]) == ["path", "caption", "name", "place", "size", "colour", "shape"]
    assert len(named_rows) == 100
    assert len({r["caption"] for r in named_rows}) == 100
    for r in named_rows:
        look = f"{r['size']} {r['colour']} {r['shape']}"
        assert r["caption"] == f"{r['name']}'s {look}, photographed in {r['place']}"
        assert (ds.root / r["path"]).is_file()
    # Several images share a look and differ only in who and where.
    by_look = defaultdict(set)
    for r in named_rows:
        by_look[(r["size"], r["colour"], r["shape"])].add((r["name"], r["place"]))
    assert max(len(v) for v in by_look.values()) >= 3
    digests = {hashlib.sha256((ds.root / r["path"]).read_bytes()).digest() for r in named_rows}
    assert len(digests) == 100
    # The pixels show the look the caption claims.
    for r in named_rows[:30]:
        with Image.open(ds.root / r["path"]) as im:
            masks = _colour_masks(np.asarray(im.convert("RGB")))
        assert masks[r["colour"]].sum() > 20
        assert sum(m.sum() for c, m in masks.items() if c != r["colour"]) == 0
    again = generate_named(tmp_path / "b", n=100, seed=1)
    assert tree_bytes(ds.root) == tree_bytes(again.root)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 10**6}, {"image_size": 4}, {"seed": -2}])
def test_named_bad_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        generate_named(tmp_path, **kwargs)
