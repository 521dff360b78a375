"""Suite ``probe``: can a linear probe read, per patch, the colour and the shape of the object
covering it? (issue #25, step 1: where the reranker's memory should come from.)

Ground truth comes from the compositional generator's layout (:func:`~mm_retrieval.datasets.
compositional.coverage`): a patch is labelled with an object when that object covers at least
``min_cover`` (default half) of the patch's pixels; other patches (background, or split between
objects and background) are not counted. Labelled patches are split further into *interior*
(covered >= 0.99: the patch alone shows a flat colour, no outline) and *edge* (the rest).

Features, per patch, from the encoder's vision tower (open_clip ViT), read with forward hooks:

* ``pixels``       -- the preprocessed patch itself (3 x p x p values): what is locally visible;
* ``patch_embed``  -- ``conv1``'s output (a linear map of ``pixels``, before positions and ln_pre);
* ``block_K``      -- the output of transformer block K (``block_{L-2}`` is the penultimate layer);
* ``final``        -- the patch tokens the encoder hands the reranker (last block, after ln_post:
  exactly what :meth:`OpenClipEncoder.encode_pixels` returns with ``with_tokens=True``).

Splits: the probe trains on the generator's *train* split (split by contrast group into probe
train / probe validation by each seed; the validation split alone picks the L2 strength) and is
tested once, per seed, on the *test* split: held-out scenes whose combinations never occur in
training. The probe is multinomial logistic regression on standardised features (full-batch
L-BFGS). Chance is reported both as 1 / classes and as the test split's majority-class share.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TARGETS = ("colour", "shape")
PASS_BAR = 0.9  # issue #25: the memory is good enough when both read at >= 0.9
MIN_COVER = 0.5
INTERIOR_COVER = 0.99
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
DEMO_ENCODER = Path(__file__).resolve().parents[1] / "models" / "demo" / "encoder"


# --------------------------------------------------------------------------- labels


def patch_labels(rows: list[dict[str, str]], image_size: int, patch: int, min_cover: float = MIN_COVER):
    """Per image and patch (row-major, as the ViT orders them): the covering object's colour and
    shape names and its cover, or ``None`` where no object covers ``min_cover`` of the patch.
    Returns a list (per row) of lists (per patch) of ``(colour, shape, cover) | None``."""
    from ..datasets.compositional import coverage, placed_objects

    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    g = image_size // patch
    out = []
    for row in rows:
        placed = placed_objects(row)
        cov = coverage(placed, image_size)  # (n, H, W)
        per_patch = cov.reshape(len(placed), g, patch, g, patch).mean(axis=(2, 4)).reshape(len(placed), g * g)
        labels: list[tuple[str, str, float] | None] = []
        for j in range(g * g):
            i = int(np.argmax(per_patch[:, j]))
            c = float(per_patch[i, j])
            labels.append((placed[i].obj.colour, placed[i].obj.shape, c) if c >= min_cover else None)
        out.append(labels)
    return out


# --------------------------------------------------------------------------- features


def patch_features(encoder: Any, paths: list[Path], *, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per-patch features of ``paths`` at every probed depth: name -> ``(images, patches, dim)``."""
    import torch
    from PIL import Image

    encoder.warm_up()
    visual = encoder.model.visual
    transform = encoder.image_transform
    blocks = list(visual.transformer.resblocks)
    p = visual.conv1.kernel_size[0]
    captured: dict[str, Any] = {}

    def keep(name):
        return lambda m, i, o: captured.__setitem__(name, o)

    hooks = [visual.conv1.register_forward_hook(keep("patch_embed"))]
    hooks += [b.register_forward_hook(keep(f"block_{k}")) for k, b in enumerate(blocks)]
    out: dict[str, list[np.ndarray]] = {}
    try:
        for s in range(0, len(paths), batch_size):
            pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in paths[s : s + batch_size]])
            _, tokens = encoder.encode_pixels(pixels, with_tokens=True)
            n = pixels.shape[0]
            feats = {
                "pixels": pixels.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3 * p * p),
                "patch_embed": captured["patch_embed"].flatten(2).transpose(1, 2),
            }
            for k in range(len(blocks)):
                x = captured[f"block_{k}"]
                x = x if x.shape[0] == n else x.transpose(0, 1)  # open_clip: batch-first or not
                feats[f"block_{k}"] = x[:, -tokens.shape[1]:]  # drop the class token
            feats["final"] = torch.from_numpy(tokens)
            for name, f in feats.items():
                out.setdefault(name, []).append(f.float().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def neighbourhood(feats: np.ndarray) -> np.ndarray:
    """Each patch's features next to its 3 x 3 neighbours' (zeros past the border), on a square
    grid: ``(images, patches, dim)`` -> ``(images, patches, 9 * dim)``. Asks whether a linear read
    finds the shape once a patch sees the whole object (3 patches span the largest object)."""
    n, p, d = feats.shape
    g = round(p**0.5)
    if g * g != p:
        raise ValueError(f"{p} patches do not form a square grid")
    pad = np.zeros((n, g + 2, g + 2, d), feats.dtype)
    pad[:, 1:-1, 1:-1] = feats.reshape(n, g, g, d)
    return np.concatenate([pad[:, i : i + g, j : j + g] for i in range(3) for j in range(3)], -1).reshape(n, p, 9 * d)


# --------------------------------------------------------------------------- the probe


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, seed: int, iters: int = 200):
    """Multinomial logistic regression (weights ``(d, classes)``, bias) by full-batch L-BFGS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = (0.01 * torch.randn(x.shape[1], n_classes, generator=g)).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def _accuracy(wb, x: np.ndarray, y: np.ndarray, *, balanced: bool = False) -> float:
    """Share of right answers; ``balanced``: the mean of the per-class recalls (chance 1 / classes
    whatever the class frequencies), over the classes present in ``y``."""
    if not len(y):
        return float("nan")
    w, b = wb
    right = np.argmax(x @ w + b, axis=1) == y
    if not balanced:
        return float(np.mean(right))
    return float(np.mean([right[y == c].mean() for c in np.unique(y)]))


def probe_one(train, val, test, n_classes: int, seed: int, test_masks: dict[str, np.ndarray], *,
              l2_grid: tuple[float, ...] = L2_GRID, iters: int = 200) -> dict[str, Any]:
    """Standardise on the probe-train split, pick the L2 strength on validation, test once."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva, xte = ((a - mean) / std for a in (xtr, xva, xte))
    scores = {}
    for l2 in l2_grid:
        scores[l2] = (_accuracy(m := fit_probe(xtr, ytr, n_classes, l2, seed, iters), xva, yva), m)
    best = max(l2_grid, key=lambda k: (scores[k][0], k))  # ties: the stronger penalty
    model = scores[best][1]
    return {"test": _accuracy(model, xte, yte), "test_balanced": _accuracy(model, xte, yte, balanced=True),
            "val": scores[best][0], "l2": best,
            **{f"test_{k}": _accuracy(model, xte[m], yte[m]) for k, m in test_masks.items()}}


def _spread(values: list[float]) -> dict[str, Any] | None:
    """Mean, standard deviation, range and every seed's value; ``None`` when no seed had patches."""
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "per_seed": [round(v, 4) for v in values]}


def probe_encoder(encoder: Any, data_root: Path, *, seeds: tuple[int, ...] = (0, 1, 2), min_cover: float = MIN_COVER,
                  val_share: float = 0.2, l2_grid: tuple[float, ...] = L2_GRID, iters: int = 200,
                  context: bool = False) -> dict[str, Any]:
    """Probe every depth of ``encoder`` on the compositional set in ``data_root`` (written by
    :func:`generate_compositional` at the encoder's input size); returns the JSON section.
    ``l2_grid``: the L2 strengths validation chooses from; ``iters``: L-BFGS iterations per fit;
    ``context``: also probe ``pixels_3x3`` and ``final_3x3`` (:func:`neighbourhood`)."""
    from ..datasets.compositional import COLOURS, SHAPES, read_table

    t0 = time.perf_counter()
    rows = {s: read_table(data_root / f"{s}.csv") for s in ("train", "test")}
    encoder.warm_up()
    visual = encoder.model.visual
    size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
    patch = int(visual.conv1.kernel_size[0])
    feats, labels = {}, {}
    for split, rs in rows.items():
        feats[split] = patch_features(encoder, [data_root / r["path"] for r in rs])
        labels[split] = patch_labels(rs, size, patch, min_cover)
        if context:
            feats[split].update({f"{k}_3x3": neighbourhood(feats[split][k]) for k in ("pixels", "final")})
    t_feat = time.perf_counter() - t0

    vocab = {"colour": sorted(COLOURS), "shape": sorted(SHAPES)}

    def flat(split: str, images: np.ndarray):
        """Indices (image, patch) of the labelled patches of ``images``, their labels and covers."""
        idx, ys, cover = [], {"colour": [], "shape": []}, []
        for i in images:
            for j, lab in enumerate(labels[split][i]):
                if lab:
                    idx.append((i, j))
                    ys["colour"].append(vocab["colour"].index(lab[0]))
                    ys["shape"].append(vocab["shape"].index(lab[1]))
                    cover.append(lab[2])
        ii = np.array(idx, dtype=np.int64).reshape(-1, 2)
        return ii, {t: np.array(v, dtype=np.int64) for t, v in ys.items()}, np.array(cover)

    te_idx, te_y, te_cover = flat("test", np.arange(len(rows["test"])))
    masks = {"interior": te_cover >= INTERIOR_COVER, "edge": te_cover < INTERIOR_COVER}
    groups = sorted({r["group"] for r in rows["train"]})
    layers = list(feats["train"])
    results: dict[str, Any] = {name: {t: [] for t in TARGETS} for name in layers}
    counts = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        val_groups = set(rng.choice(groups, max(1, round(val_share * len(groups))), replace=False).tolist())
        is_val = np.array([r["group"] in val_groups for r in rows["train"]])
        tr_idx, tr_y, _ = flat("train", np.flatnonzero(~is_val))
        va_idx, va_y, _ = flat("train", np.flatnonzero(is_val))
        counts.append({"train": len(tr_idx), "val": len(va_idx)})
        for name in layers:
            f_tr, f_te = feats["train"][name], feats["test"][name]
            x = (f_tr[tr_idx[:, 0], tr_idx[:, 1]], f_tr[va_idx[:, 0], va_idx[:, 1]], f_te[te_idx[:, 0], te_idx[:, 1]])
            for t in TARGETS:
                r = probe_one((x[0], tr_y[t]), (x[1], va_y[t]), (x[2], te_y[t]), len(vocab[t]), seed, masks,
                              l2_grid=l2_grid, iters=iters)
                results[name][t].append(r)
    chance = {t: {"uniform": round(1 / len(vocab[t]), 4),
                  "majority": round(float(np.bincount(te_y[t]).max() / len(te_y[t])), 4)} for t in TARGETS}
    layers_out = {}
    for name in layers:
        layers_out[name] = {"dim": int(feats["train"][name].shape[-1])}
        for t in TARGETS:
            rs = results[name][t]
            layers_out[name][t] = {
                "test": _spread([r["test"] for r in rs]),
                "test_balanced": _spread([r["test_balanced"] for r in rs]),
                "test_interior": _spread([r["test_interior"] for r in rs]),
                "test_edge": _spread([r["test_edge"] for r in rs]),
                "val": _spread([r["val"] for r in rs]),
                "l2_chosen": [r["l2"] for r in rs],
            }
        layers_out[name]["passes"] = all(layers_out[name][t]["test"]["mean"] >= PASS_BAR for t in TARGETS)
    n_blocks = sum(k.startswith("block_") for k in layers)
    return {
        "image_size": size, "patch": patch, "patches_per_image": (size // patch) ** 2,
        "blocks": n_blocks, "penultimate": f"block_{n_blocks - 2}" if n_blocks >= 2 else None,
        "rule": f"a patch counts when one object covers >= {min_cover} of its pixels; interior: covered >= {INTERIOR_COVER}",
        "images": {"train_split": len(rows["train"]), "test_split": len(rows["test"])},
        "patches": {"test": len(te_idx), "test_interior": int(masks["interior"].sum()), "test_edge": int(masks["edge"].sum()),
                    "per_seed_train_val": counts},
        "classes": vocab, "chance": chance, "seeds": list(seeds), "l2_grid": list(l2_grid),
        "pass_bar": PASS_BAR, "layers": layers_out,
        "seconds": {"features": round(t_feat, 1), "total": round(time.perf_counter() - t0, 1)},
    }


# --------------------------------------------------------------------------- the suite


def run(root: Path, device: str, *, quick: bool = False, encoder: str | None = None,
        seeds: tuple[int, ...] = (0, 1, 2), context: bool = False) -> dict[str, Any]:
    """Probe ``encoder`` (default: the shipped demo encoder) on the demo's data (generator seed
    0: the images the demo encoder was trained on, plus its held-out test split)."""
    from ..datasets import generate_compositional
    from ..stages.encoders.open_clip import OpenClipEncoder

    model = encoder or str(DEMO_ENCODER)
    enc = OpenClipEncoder({"model": model, "device": device, "workers": 0})
    enc.warm_up()
    vis = enc.model.visual
    size = int(vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else vis.image_size)
    n_train, n_test = (64, 32) if quick else (2000, 500)
    t = time.perf_counter()
    data = generate_compositional(root / "probe" / "data", n_train=n_train, n_test=n_test, image_size=size, seed=0)
    gen_s = time.perf_counter() - t
    fit = {"seeds": seeds[:2], "l2_grid": (1e-2,), "iters": 50} if quick else {"seeds": seeds}
    fit["context"] = context
    section = probe_encoder(enc, data.root, **fit)
    section["encoder"] = "demo (shipped)" if encoder is None else encoder
    section["pool_type"] = getattr(vis, "pool_type", None)
    section["seconds"]["generate"] = round(gen_s, 1)
    return section


def summary_lines(p: dict[str, Any]) -> list[str]:
    """The suite's lines in ``mmr bench``'s summary."""
    ch = p["chance"]
    head = (f"probe   linear probe per patch on held-out scenes, {p['encoder']} (pool {p['pool_type']}), "
            f"{p['patches']['test']} test patches ({p['rule']}); seeds {p['seeds']}; chance colour "
            f"{ch['colour']['uniform']:.2f} (majority {ch['colour']['majority']:.2f}), shape {ch['shape']['uniform']:.2f} "
            f"(majority {ch['shape']['majority']:.2f}; balanced accuracy's chance is 1 / classes); pass >= {p['pass_bar']} on both")
    lines = [head]
    for name, lay in p["layers"].items():
        c, s = lay["colour"], lay["shape"]
        lines.append(f"        {name:<12} colour {c['test']['mean']:.3f} +- {c['test']['std']:.3f}  shape {s['test']['mean']:.3f} "
                     f"+- {s['test']['std']:.3f}  (shape balanced {_mean(s['test_balanced'])}, "
                     f"interior/edge {_mean(s['test_interior'])}/{_mean(s['test_edge'])})"
                     f"{'  PASS' if lay['passes'] else ''}")
    return lines


def _mean(spread: dict[str, Any] | None) -> str:
    return "n/a" if spread is None else f"{spread['mean']:.3f}"


def main(argv: list[str] | None = None) -> int:
    """``python -m mm_retrieval.bench.probe [--encoder DIR] [--out FILE]``: the suite on any
    encoder (e.g. one retrained with ``pool_type="avg"``), written as an ``mmr bench`` document."""
    import argparse
    import json
    import tempfile

    from . import _run_info, machine, targets

    parser = argparse.ArgumentParser(prog="python -m mm_retrieval.bench.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", help="encoder to probe: a `mmr train-encoder` folder or model name (default: the demo's)")
    parser.add_argument("--seeds", default="0,1,2", help="probe seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--context", action="store_true", help="also probe each patch with its 3x3 neighbours (slower)")
    parser.add_argument("--out", help="write the document here (render it with `mmr bench --from FILE`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    with tempfile.TemporaryDirectory(prefix="mmr-probe-") as tmp:
        section = run(Path(args.workdir or tmp), args.device, encoder=args.encoder, seeds=seeds, context=args.context)
    info = machine.describe(args.device)
    doc = {"quick": False, "machine": info, "suites": {"probe": section}, "runs": {"probe": _run_info(info, False)},
           "seconds": section["seconds"]["total"]}
    doc["targets"] = targets.judge(doc["suites"], info)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print("\n".join(summary_lines(section)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
