"""Suite ``dupes``: how well ``mmr duplicates`` groups copies of one photo, and what it costs.

* **Groups: precision and recall.** Photo-like shots (as :func:`~mm_retrieval.bench.images.make_image`:
  gradient, shapes, sensor noise) in *subjects*: several distinct shots share a subject's light and
  colours (objects placed and sized anew, fresh noise: not copies, yet close in the image vectors). Each shot
  gets generated copies: re-saved as JPEG (quality 30-95), resized (0.25-1x), cropped (2-10 % of
  each side's length in all), turned 90 degrees, a small colour change (brightness, saturation),
  and a burst frame (shifted 1-3 %, fresh sensor noise). All are indexed with the shipped demo
  model (trained ``mmr-tiny``) through ``Pipeline.index``, whose decode computes the hashes; the
  groups of :func:`~mm_retrieval.duplicates.find_groups` are scored by pairs: precision = pairs
  put in one group that are copies of one shot, recall = copy pairs put in one group. The
  thresholds are swept over the same candidate pairs, so the defaults are chosen from measured
  figures (and the figures for the defaults are reported on their own), with recall per kind of copy.
* **Time for N items.** ``find_groups`` over N synthetic rows (10 000 in the full run; 512-d
  vectors, a third of them in groups of near copies) upserted into Milvus Lite: the whole
  command's work (rows read, a range search per item through the index, hashes compared).
* **Hash cost at index time.** :func:`~mm_retrieval.neardup.image_phash` on a decoded 3 MP
  photo, beside decoding that photo.
"""

from __future__ import annotations

import io
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .timing import figure, summary

KINDS = ("jpeg", "resize", "crop", "rotate90", "colour", "burst")
MIN_SIMS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
MAX_DISTS = (4, 6, 8, 10, 12, 14, 16, 18, 20, 24)


def make_shot(subject: int, shapes: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A shot of a subject: the subject's light and colours (seeded by ``subject``), this shot's
    own composition (``shapes``: where the objects are, how large) and sensor noise."""
    pal = np.random.default_rng(subject)
    c0, cx, cy = (pal.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    colours = pal.uniform(0, 255, (4, 3))
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    img = c0 * 0.5 + cx * x * 0.5 + cy * y * 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(shapes.integers(3, 7))):
        px, py = shapes.uniform(0, w), shapes.uniform(0, h)
        rx, ry = shapes.uniform(0.05, 0.3) * w, shapes.uniform(0.05, 0.3) * h
        img[((xx - px) / rx) ** 2 + ((yy - py) / ry) ** 2 <= 1.0] = colours[int(shapes.integers(4))]
    img += shapes.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_copy(im: Any, kind: str, rng: random.Random) -> tuple[Any, int]:
    """A copy of ``im`` of ``kind`` and the JPEG quality to save it at."""
    from PIL import Image, ImageEnhance

    w, h = im.size
    if kind == "jpeg":  # not the originals' 92: the same bytes are one item, not a copy
        return im, rng.choice([q for q in range(30, 96) if q != 92])
    if kind == "resize":
        f = rng.uniform(0.25, 1.0)
        return im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.LANCZOS), 85
    if kind == "crop":
        fx, fy = rng.uniform(0.02, 0.10), rng.uniform(0.02, 0.10)
        lx, ty = rng.uniform(0, fx), rng.uniform(0, fy)
        return im.crop((round(w * lx), round(h * ty), round(w * (1 - fx + lx)), round(h * (1 - fy + ty)))), 90
    if kind == "rotate90":
        return im.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270])), 90
    if kind == "colour":
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.9, 1.1))
        return ImageEnhance.Color(im).enhance(rng.uniform(0.85, 1.15)), 90
    if kind == "burst":  # the next frame of a burst: the camera moved a little, new sensor noise
        dx, dy = round(w * rng.uniform(0.01, 0.03)), round(h * rng.uniform(0.01, 0.03))
        a = np.asarray(im.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BILINEAR)).astype(np.float32)
        a += np.random.default_rng(rng.randrange(1 << 31)).normal(0.0, 6.0, a.shape).astype(np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), 90
    raise ValueError(kind)


def _library(folder: Path, subjects: int, shots: int, kinds_per_shot: int, w: int, h: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write the set; returns path -> (shot, kind) ('original' for a shot itself)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    truth: dict[str, tuple[str, str]] = {}
    for s in range(subjects):
        palette_seed = rng.randrange(1 << 31)
        for k in range(shots):
            shot = f"s{s:03d}k{k}"
            im = Image.fromarray(make_shot(palette_seed, np.random.default_rng(rng.randrange(1 << 31)), w, h))
            path = folder / f"{shot}.jpg"
            im.save(path, quality=92)
            truth[str(path)] = (shot, "original")
            kinds = list(KINDS) if kinds_per_shot >= len(KINDS) else rng.sample(KINDS, kinds_per_shot)
            for kind in kinds:
                copy, quality = make_copy(im, kind, rng)
                p = folder / f"{shot}-{kind}.jpg"
                copy.save(p, quality=quality)
                truth[str(p)] = (shot, kind)
    return truth


def _score(pairs: list[tuple[str, str, float, int]], shot_of: dict[str, str], kind_of: dict[str, str], min_sim: float,
           max_dist: int) -> dict[str, Any]:
    """Pairwise precision/recall of the groups the rule makes from ``pairs``."""
    from ..neardup import UnionFind, same_photo

    uf = UnionFind()
    for a, b, sim, d in pairs:
        if same_photo(sim, d, min_similarity=min_sim, max_distance=max_dist):
            uf.union(a, b)
    group = {i: uf.find(i) for i in uf.parent}
    members: dict[str, list[str]] = {}
    for i, shot in shot_of.items():
        members.setdefault(shot, []).append(i)
    predicted = sum(len(g) * (len(g) - 1) // 2 for g in uf.groups())
    correct = 0
    for g in uf.groups():
        by_shot: dict[str, int] = {}
        for i in g:
            by_shot[shot_of[i]] = by_shot.get(shot_of[i], 0) + 1
        correct += sum(n * (n - 1) // 2 for n in by_shot.values())
    true_pairs = sum(len(m) * (len(m) - 1) // 2 for m in members.values())
    per_kind: dict[str, list[int]] = {}
    for i, kind in kind_of.items():
        if kind == "original":
            continue
        orig = next(j for j in members[shot_of[i]] if kind_of[j] == "original")
        hit = i in group and orig in group and group[i] == group[orig]
        per_kind.setdefault(kind, []).append(int(hit))
    p = correct / predicted if predicted else 1.0
    r = correct / true_pairs if true_pairs else 1.0
    return {"min_similarity": min_sim, "max_distance": max_dist, "precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "groups": len(uf.groups()),
            "recall_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(per_kind.items())}}


def _quality(work: Path, quick: bool) -> dict[str, Any]:
    from ..decode import content_hash, item_id
    from ..demo import SHIPPED
    from ..duplicates import candidate_pairs
    from ..neardup import MAX_HASH_DISTANCE, MIN_SIMILARITY
    from ..pipeline import Pipeline

    subjects, shots, kinds, (w, h) = (4, 2, 3, (320, 240)) if quick else (30, 3, len(KINDS), (640, 480))
    folder = work / f"set-{subjects}-{shots}-{kinds}-{w}"
    truth = _library(folder, subjects, shots, kinds, w, h)
    ids: dict[str, tuple[str, str]] = {}
    for p, v in truth.items():  # originals first: a copy with an original's very bytes is that item
        ids.setdefault(item_id(content_hash(Path(p).read_bytes())), v)
    db = work / f"dupes-{subjects}-{w}.db"
    for old in work.glob(f"dupes-{subjects}-{w}.db*"):  # a fresh index: the hashes are this code's
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    t = time.perf_counter()
    with Pipeline(db=str(db), model=str(SHIPPED / "encoder"), device="cpu", encoder={"workers": 0}) as pipe:
        report = pipe.index(str(folder))
        index_s = time.perf_counter() - t
        _, pairs = candidate_pairs(pipe.store, min_similarity=min(MIN_SIMS), neighbours=16)
    shot_of = {i: v[0] for i, v in ids.items()}
    kind_of = {i: v[1] for i, v in ids.items()}
    sweep = [_score(pairs, shot_of, kind_of, s, d) for s in MIN_SIMS for d in MAX_DISTS]
    best = max(sweep, key=lambda r: (r["f1"], r["recall"]))
    default = _score(pairs, shot_of, kind_of, MIN_SIMILARITY, MAX_HASH_DISTANCE)
    return {"images": len(truth), "subjects": subjects, "shots_per_subject": shots, "copies_per_shot": kinds,
            "size": [w, h], "model": "demo (trained mmr-tiny)", "indexed": report.indexed, "index_seconds": round(index_s, 1),
            "candidate_pairs": len(pairs), "default": default, "best": best,
            "sweep": [{k: r[k] for k in ("min_similarity", "max_distance", "precision", "recall", "f1")} for r in sweep]}


def _timing(work: Path, n: int) -> dict[str, Any]:
    from ..duplicates import find_groups
    from ..pipeline import Pipeline
    from .search import VectorEncoder

    rng = np.random.default_rng(0)
    dim = VectorEncoder.dim
    rows, originals = [], 0
    i = 0
    while len(rows) < n:
        base = rng.normal(size=dim).astype(np.float32)
        bits = int(rng.integers(0, 1 << 63))
        copies = int(rng.integers(1, 4)) if rng.random() < 0.15 else 0  # ~1/3 of the rows are copies or have them
        originals += copies > 0
        for c in range(1 + copies):
            v = base + (rng.normal(size=dim).astype(np.float32) * 0.15 if c else 0)
            flipped = bits
            for _ in range(int(rng.integers(0, 6)) if c else 0):
                flipped ^= 1 << int(rng.integers(0, 64))
            h = format(flipped, "016x")
            rows.append({"id": format(i, "032x"), "vector": v / np.linalg.norm(v), "path": f"/synthetic/{i}.jpg",
                         "metadata": {"phash": h * 4, "width": 640, "height": 480}, "file_size": 1000 + i})
            i += 1
    rows = rows[:n]
    with Pipeline(db=str(work / f"timing-{n}.db"), collection=f"dupes_{n}", encoder=VectorEncoder()) as pipe:
        store = pipe.store
        store.drop()
        store.ensure_collection(VectorEncoder().info())
        store.upsert(rows)
        store.flush()
        store.search(np.asarray([rows[0]["vector"]]), 5)  # loaded, index built, before the clock starts
        t = time.perf_counter()
        report = find_groups(store)
        seconds = time.perf_counter() - t
    return {"items": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 1), "groups": len(report.groups),
            "groups_planted": originals, "note": "synthetic rows (512-d vectors, hashes): the command's own work, no decoding"}


def _hash_cost(quick: bool) -> dict[str, Any]:
    from PIL import Image

    from ..decode import decode_image
    from ..neardup import image_phash
    from .images import make_image

    w, h = (640, 480) if quick else (2016, 1512)
    buf = io.BytesIO()
    Image.fromarray(make_image(np.random.default_rng(1), w, h)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    import open_clip

    from ..decode import ClipPreprocess

    # what the indexer hashes: the model's resized input (here ViT-B-32's 224 px), not the full decode
    resize = ClipPreprocess.of(open_clip.image_transform(224, is_train=False)).resize
    image_phash(decode_image(data))  # imports
    dec, hsh, small = [], [], []
    for _ in range(5 if quick else 20):
        t = time.perf_counter()
        im = decode_image(data)
        dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        image_phash(im)
        hsh.append(time.perf_counter() - t)
        resized = resize(im)
        t = time.perf_counter()
        image_phash(resized)
        small.append(time.perf_counter() - t)
    return {"size": [w, h], "phash": summary(hsh), "decode": summary(dec), "phash_at_index": summary(small),
            "phash_at_index_what": "the hash of the model's resized input (224 px shorter side), as the indexer takes it; "
                                   "'phash' is the full-size photo's (mmr duplicates --backfill)",
            "phash_vs_decode": figure(statistics.median(hsh) * 1000, "ms", "decoding the JPEG", statistics.median(dec) * 1000)}


def run(root: Path, device: str, *, quick: bool = False) -> dict[str, Any]:
    work = root / "dupes"
    work.mkdir(parents=True, exist_ok=True)
    return {"groups": _quality(work, quick), "time": _timing(work, 1000 if quick else 10_000), "hash_cost": _hash_cost(quick)}


def summary_lines(d: dict[str, Any]) -> list[str]:
    g, t, c = d["groups"], d["time"], d["hash_cost"]
    df, b = g["default"], g["best"]
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in df["recall_by_kind"].items())
    return [
        (f"dupes groups: precision {df['precision']:.3f} recall {df['recall']:.3f} at the defaults (similarity >= "
         f"{df['min_similarity']}, hash distance <= {df['max_distance']}) on {g['images']} images; best of the sweep F1 "
         f"{b['f1']:.3f} at >= {b['min_similarity']} / <= {b['max_distance']}"),
        f"dupes recall by copy: {kinds}",
        (f"dupes time: {t['items']} items in {t['seconds']} s ({t['items_per_s']} items/s), {t['groups']} groups "
         f"({t['groups_planted']} planted)"),
        f"dupes hash: {c['phash']['p50_ms']} ms p50 per {c['size'][0]}x{c['size'][1]} photo vs {c['decode']['p50_ms']} ms to decode it"
        + (f"; at index time (from the model's resized input) {c['phash_at_index']['p50_ms']} ms" if "phash_at_index" in c else ""),
    ]
