"""Binding experiments for the cross-attention reranker (issue #25 steps 2-3), on the demo's data.

``python -m mm_retrieval.bench.binding --variant NAME --seeds 0,1,2 --out FILE`` trains the
reranker over the shipped demo encoder on the compositional set's training split (generator seed
0, the demo's), choosing epochs and the first-stage weight on a validation split held out by
group and combination (as the demo does), and measures once per seed on the held-out test split
(gallery: every train and test image, as the demo's collection):

* first stage vs reranked R@1 / R@10 (the first stage's top 100 reranked);
* contrast-group accuracy: the caption's own scene first among its group's four scenes;
* per contrast kind: own scene above its colour-swapped / relation-flipped / both twin (pairwise).

Variants (:data:`VARIANTS`) name a recipe: the demo's without a phrase head, plus binding
negatives, a local image side and/or the phrase head (``phrase``: ``RerankerConfig.phrase_dim``). ``--probe`` also fits a per-patch linear shape probe on the local image side's output
(:mod:`.probe`'s labels and probe), the step-2 question "is shape now decodable per patch?".
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEMO_ENCODER = Path(__file__).resolve().parents[1] / "models" / "demo" / "encoder"
KINDS = {1: "colour_swap", 2: "relation_flip", 3: "swap_flip"}  # variant index XOR -> kind
VARIANT_INDEX = {"base": 0, "colour_swap": 1, "relation_flip": 2, "swap_flip": 3}

_BASE = {"lr": 1e-3, "negatives": 7, "hard_pool": 100, "patience": 4, "epochs": 10,
         "reranker_config": {"width": 128, "heads": 2, "phrase_dim": 0}}
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {**_BASE},
    "binding": {**_BASE, "binding": True},
    "local": {**_BASE, "reranker_config": {"width": 128, "heads": 2, "local_channels": 64, "phrase_dim": 0}},
    "binding+local": {**_BASE, "binding": True, "reranker_config": {"width": 128, "heads": 2, "local_channels": 64, "phrase_dim": 0}},
    "phrase": {**_BASE, "reranker_config": {"width": 128, "heads": 2, "phrase_dim": 64}},
    "binding+phrase": {**_BASE, "binding": True, "reranker_config": {"width": 128, "heads": 2, "phrase_dim": 64}},
}


def prepare(workdir: Path, device: str = "cpu") -> dict[str, Any]:
    """Data, encoder and features (with binding negatives and pixels), computed once."""
    from ..datasets import generate_compositional
    from ..stages.encoders.open_clip import OpenClipEncoder
    from ..training.reranker import data
    from ..training.reranker.binding import add_binding_negatives, load_pixels

    root = workdir / "data"
    if not (root / "all.csv").is_file():
        generate_compositional(root, n_train=2000, n_test=500, seed=0)
    enc = OpenClipEncoder({"model": str(DEMO_ENCODER), "device": device, "workers": 0})
    enc.warm_up()
    rows = data.read_rows(root / "all.csv", ("group", "combination"))
    feats = data.encode(enc, rows, progress=False)
    stats = add_binding_negatives(feats, enc, feats.captions)
    feats.pixels = load_pixels(enc, feats.image_paths)
    table = {r["path"]: r for r in _read(root / "all.csv")}
    return {"encoder": enc, "feats": feats, "root": root, "binding_stats": stats,
            "image_rows": [table[str(Path(p).relative_to(root.resolve()))] for p in feats.image_paths]}


def _read(path: Path) -> list[dict[str, str]]:
    from ..datasets.compositional import read_table

    return read_table(path)


def train_one(prep: dict[str, Any], variant: str, seed: int, device: str = "cpu", epochs: int | None = None):
    """Train ``variant`` with ``seed`` on the train split; return the test report and the model."""
    import torch

    from ..training.reranker import data, split
    from ..training.reranker.config import RerankerTrainConfig
    from ..training.reranker.loop import TrainLoop

    recipe_kw = dict(VARIANTS[variant])
    epochs = epochs or recipe_kw.pop("epochs")
    recipe_kw.pop("epochs", None)
    overrides = dict(recipe_kw.pop("reranker_config"))
    recipe = RerankerTrainConfig(seed=seed, epochs=epochs, split_by=("group", "combination"), **recipe_kw)
    feats_all = prep["feats"]
    is_train = torch.tensor(["/images/train/" in p for p in feats_all.image_paths])
    keep = is_train[feats_all.row_image]
    feats = copy.copy(feats_all)
    feats.row_image, feats.row_caption = feats_all.row_image[keep], feats_all.row_caption[keep]
    feats.row_unit = [u for u, k in zip(feats_all.row_unit, keep.tolist()) if k]
    if not recipe.binding:
        feats.caption_twins = feats.caption_rewrites = None
    t0, c0 = time.perf_counter(), time.process_time()
    train, val = split.split(feats, recipe.val_fraction, recipe.seed)
    cfg = data.model_config(prep["encoder"], feats, overrides)
    n_neg, pool = split.negative_counts(train, recipe.negatives, recipe.hard_pool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loop = TrainLoop(cfg, feats, train, split.hard_pools(train, pool), val, n_neg, torch.device(device), recipe)
        if loop.val_twins is None:  # contrast on val for every variant, with the same twins
            from ..training.reranker.loop import _twin_images

            loop.val_twins = _twin_images(val, feats_all)
        loop.evaluate_initial()
        loop.run(recipe.epochs, recipe.patience, False, lambda: None)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    model = loop.best_model()
    report = {"variant": variant, "seed": seed, "config": cfg.to_dict(), "best_epoch": loop.best_epoch,
              "epochs_run": loop.epoch, "history": loop.history, "train_s": round(train_s, 1),
              "train_cpu_s": round(train_cpu, 1), "test": evaluate_test(model, prep)}
    return report, model


def evaluate_test(model: Any, prep: dict[str, Any], depth: int = 100) -> dict[str, Any]:
    """First stage vs reranked on the test captions (gallery: every image)."""
    import torch

    feats, rows = prep["feats"], prep["image_rows"]
    n_img = feats.image_emb.shape[0]
    test_rows = [i for i in range(len(feats.row_image)) if rows[int(feats.row_image[i])]["split"] == "test"]
    caps = list(dict.fromkeys(int(feats.row_caption[i]) for i in test_rows))
    cap_pos = {c: k for k, c in enumerate(caps)}
    relevant = torch.zeros(len(caps), n_img, dtype=torch.bool)
    for i in range(len(feats.row_image)):
        c = int(feats.row_caption[i])
        if c in cap_pos:
            relevant[cap_pos[c], int(feats.row_image[i])] = True
    sims = feats.text_emb[caps] @ feats.image_emb.T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    top = order[:, :depth]
    scale = float(model.retrieval_scale.detach())
    with torch.no_grad():
        used = top.unique()
        mem = _memory(model, feats, used)
        slot = torch.full((n_img,), -1, dtype=torch.long)
        slot[used] = torch.arange(len(used))
        heads = []
        for s in range(0, len(caps), 40):
            cand = top[s : s + 40]
            b = cand.shape[0]
            cc = torch.tensor(caps[s : s + b]).repeat_interleave(depth)
            heads.append(model(feats.text_tokens[cc], feats.text_mask[cc], mem[slot[cand.reshape(-1)]],
                               torch.zeros(b * depth), pairs=True, chunk_size=1024, roles=_roles(model, feats, cc)).view(b, depth))
        head = torch.cat(heads)
    rer = torch.sort(scale * sims.gather(1, top) + head, dim=1, descending=True, stable=True).indices
    ranking = torch.cat([top.gather(1, rer), order[:, depth:]], 1)

    def rk(r):
        hit = relevant.gather(1, r).to(torch.uint8).argmax(1)
        return {"R@1": float((hit < 1).double().mean()), "R@10": float((hit < 10).double().mean())}

    out = {"first_stage": rk(order), "reranked": rk(ranking), "queries": len(caps)}
    out["contrast"] = _contrast_test(model, prep, test_rows, scale)
    return out


def _roles(model, feats, caps):
    return feats.text_roles[caps] if model.phrases is not None else None


def _memory(model, feats, images):
    pixels = feats.pixels[images].float() if model.needs_pixels else None
    return model.image_memory(feats.image_tokens[images].float(), pixels)


def _contrast_test(model, prep, test_rows, scale) -> dict[str, Any]:
    """Own scene first among its group's scenes, and pairwise per contrast kind."""
    import torch

    feats, rows = prep["feats"], prep["image_rows"]
    groups: dict[str, list[int]] = {}
    for i in test_rows:
        img = int(feats.row_image[i])
        groups.setdefault(rows[img]["group"], [])
        if img not in groups[rows[img]["group"]]:
            groups[rows[img]["group"]].append(img)
    first_ok = rer_ok = n = 0
    kind = {k: {"first": 0, "reranked": 0, "n": 0} for k in KINDS.values()}
    for i in test_rows:
        img, cap = int(feats.row_image[i]), int(feats.row_caption[i])
        members = groups[rows[img]["group"]]
        if len(members) < 2:
            continue
        m = torch.tensor(members)
        with torch.no_grad():
            first = feats.text_emb[cap] @ feats.image_emb[m].T
            head = model(feats.text_tokens[[cap]], feats.text_mask[[cap]], _memory(model, feats, m), torch.zeros(len(m)),
                         roles=_roles(model, feats, [cap]))[0]
        rer = scale * first + head
        own = members.index(img)
        first_ok += int(first.argmax()) == own
        rer_ok += int(rer.argmax()) == own
        n += 1
        v = VARIANT_INDEX[rows[img]["variant"]]
        for j, other in enumerate(members):
            if other == img:
                continue
            k = KINDS[v ^ VARIANT_INDEX[rows[other]["variant"]]]
            kind[k]["n"] += 1
            kind[k]["first"] += int(first[own] > first[j])
            kind[k]["reranked"] += int(rer[own] > rer[j])
    per_kind = {k: {"first": d["first"] / max(d["n"], 1), "reranked": d["reranked"] / max(d["n"], 1), "pairs": d["n"]}
                for k, d in kind.items()}
    return {"queries": n, "first_stage": first_ok / max(n, 1), "reranked": rer_ok / max(n, 1), "per_kind": per_kind}


def probe_local(model: Any, prep: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Per-patch linear shape/colour probe on the local image side's features (and on the memory)."""
    import torch

    from ..datasets.compositional import COLOURS, SHAPES
    from .probe import patch_labels, probe_one

    feats, rows = prep["feats"], prep["image_rows"]
    grid = round(feats.image_tokens.shape[1] ** 0.5)
    size = feats.pixels.shape[-1]
    labels = patch_labels(rows, size, size // grid)
    with torch.no_grad():
        all_imgs = torch.arange(len(rows))
        layers = {"memory": torch.cat([_memory(model, feats, all_imgs[s : s + 256]) for s in range(0, len(rows), 256)])}
        if model.needs_pixels:
            layers["local"] = torch.cat([model.local(feats.pixels[s : s + 256].float()) for s in range(0, len(rows), 256)])
    vocab = {"colour": sorted(COLOURS), "shape": sorted(SHAPES)}
    rng = np.random.default_rng(seed)
    train_imgs = [i for i, r in enumerate(rows) if r["split"] == "train"]
    groups = sorted({rows[i]["group"] for i in train_imgs})
    val_groups = set(rng.choice(groups, round(0.2 * len(groups)), replace=False).tolist())

    def flat(imgs):
        idx, ys = [], {"colour": [], "shape": []}
        for i in imgs:
            for j, lab in enumerate(labels[i]):
                if lab:
                    idx.append((i, j))
                    ys["colour"].append(vocab["colour"].index(lab[0]))
                    ys["shape"].append(vocab["shape"].index(lab[1]))
        return np.array(idx), {k: np.array(v) for k, v in ys.items()}

    tr = flat([i for i in train_imgs if rows[i]["group"] not in val_groups])
    va = flat([i for i in train_imgs if rows[i]["group"] in val_groups])
    te = flat([i for i, r in enumerate(rows) if r["split"] == "test"])
    out = {}
    for name, f in layers.items():
        f = f.float().numpy()
        x = [f[s[0][:, 0], s[0][:, 1]] for s in (tr, va, te)]
        out[name] = {t: probe_one((x[0], tr[1][t]), (x[1], va[1][t]), (x[2], te[1][t]), len(vocab[t]), seed, {},
                                  l2_grid=(1e-3, 1e-2), iters=100)["test"] for t in ("colour", "shape")}
    return out


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread and every seed of the headline numbers."""
    def s(vals):
        return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                "per_seed": [round(v, 4) for v in vals]}

    t = [r["test"] for r in reports]
    out = {
        "seeds": [r["seed"] for r in reports],
        "R@1": {"first": s([x["first_stage"]["R@1"] for x in t]), "reranked": s([x["reranked"]["R@1"] for x in t])},
        "R@10": {"first": s([x["first_stage"]["R@10"] for x in t]), "reranked": s([x["reranked"]["R@10"] for x in t])},
        "contrast": {"first": s([x["contrast"]["first_stage"] for x in t]), "reranked": s([x["contrast"]["reranked"] for x in t])},
        "per_kind_reranked": {k: s([x["contrast"]["per_kind"][k]["reranked"] for x in t]) for k in KINDS.values()},
        "per_kind_first": {k: s([x["contrast"]["per_kind"][k]["first"] for x in t]) for k in KINDS.values()},
        "val_contrast_best": s([next(h.get("contrast", float("nan")) for h in r["history"] if h["epoch"] == r["best_epoch"]) for r in reports]),
        "train_cpu_s": [r["train_cpu_s"] for r in reports], "train_s": [r["train_s"] for r in reports],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m mm_retrieval.bench.binding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workdir", required=True, help="data is generated here once and reused")
    parser.add_argument("--probe", action="store_true", help="probe the trained model's local features (seed 0)")
    parser.add_argument("--shipped", action="store_true", help="also measure the shipped demo reranker")
    parser.add_argument("--epochs", type=int, help="override the variant's epoch budget")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    cached = Path(args.workdir) / "prep.pt"
    if cached.is_file():  # features of an earlier run on the same data (this is an experiment tool)
        import torch

        from ..stages.encoders.open_clip import OpenClipEncoder

        from ..training.reranker.data import Features

        prep = torch.load(cached, weights_only=True)  # plain tensors and containers only
        prep["feats"], prep["root"] = Features(**prep["feats"]), Path(prep["root"])
        prep["encoder"] = OpenClipEncoder({"model": str(DEMO_ENCODER), "device": "cpu", "workers": 0})
        prep["encoder"].warm_up()
        if prep["feats"].text_roles is None:  # cached before the phrase head existed: prepare again
            cached.unlink()
            return main(argv)
    else:
        import torch

        prep = prepare(Path(args.workdir))
        import dataclasses

        torch.save({**{k: v for k, v in prep.items() if k != "encoder"}, "root": str(prep["root"]),
                    "feats": {f.name: getattr(prep["feats"], f.name) for f in dataclasses.fields(prep["feats"])}}, cached)
    log.info("prepared in %.0fs (load %s)", time.perf_counter() - t0, os.getloadavg())
    doc: dict[str, Any] = {"binding_stats": prep["binding_stats"], "variants": {}}
    if args.shipped:  # the shipped demo reranker on the same test measurement
        from ..stages.rerankers.cross_attention.checkpoint import load_reranker

        shipped, _ = load_reranker(DEMO_ENCODER.parent / "reranker")
        doc["shipped"] = evaluate_test(shipped, prep)
        log.info("shipped: %s", json.dumps(doc["shipped"]))
        Path(args.out).write_text(json.dumps(doc, indent=1))
    for variant in args.variant:
        reports = []
        for seed in (int(x) for x in args.seeds.split(",")):
            load0 = os.getloadavg()[0]
            report, model = train_one(prep, variant, seed, epochs=args.epochs)
            report["load_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            if args.probe and not reports:
                report["probe"] = probe_local(model, prep)
            reports.append(report)
            log.info("%s seed %d: %s", variant, seed, json.dumps({k: report[k] for k in ("best_epoch", "train_cpu_s", "test")}))
            doc["variants"][variant] = {"runs": reports, "summary": summarise(reports)}
            Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
