"""Suite ``blip``: the BLIP reranker (``reranker/blip_itm``) from cached vision tokens against BLIP
re-encoding the same images, per storage option.

One checkpoint (``mmr bench --blip NAME_OR_DIR``; by default a random BLIP-base-sized one from
:mod:`.blip_model`, or the tiny one with ``--quick``) and one device for everything. For each input
resolution (the checkpoint's, e.g. 384 px, and a lower one, e.g. 224 px, through
``interpolate_pos_encoding``) and each storage option (fp16; int8 with a per-token scale):

* **index**: the real indexing path (:mod:`.blip_index`) over the generated images without and
  with BLIP tokens: images/s, and the tokens written through each option's ``token_writer()``.
* **bytes per image**: what the stage says (``info()``), the token cache's ``bytes_per_item`` and
  the cache file's size / items (SQLite's overhead included).
* **rerank ``candidates`` (100)**, p50: the stage's ``score`` from cached tokens (query
  tokenisation, cache read, decoding, text encoder with cross-attention, ITM head) against BLIP
  re-encoding the same images on the same device with the same model: (a) *vision model on
  preprocessed pixels* (pixels decoded and resized before the clock, on the host as a loader
  leaves them), (b) *decode + preprocess + vision model* (from the image files); both then score
  with the stage's own text side. The two sides are compared: the cached tokens must be the
  re-encoded ones stored in the same option, bit for bit, and score the same (``identical``); the
  difference from unstored tokens is the option's own loss. On a CPU, where one sample per path
  is all there is time for, the speed-up is also given by this process's CPU time.
* **agreement** of each option with fp16 at the checkpoint's resolution on the same candidates:
  max score difference, Kendall tau, top-10 overlap (meaningless with random weights: said so).
* **parity** (CPU, fp32): the stage's ITM logits against transformers'
  ``BlipForImageTextRetrieval(..., use_itm_head=True)`` on a few images.
* **fold** (the checkpoint's resolution, fp16): the stage's text side with folded cross-attention
  keys and values against the standard one (every cached token projected in every layer), each
  rerank of the ``candidates`` timed and set against re-encoding, with its multiply-accumulates
  per candidate (analytic, :func:`..stages.rerankers.blip_itm.itm.text_macs`) and the rate they
  ran at; which path the stage picked for the query (``path_used``); and a sweep of query lengths
  on a few candidates (``break_even``) that finds where folding stops paying on this device.
* **lazy** (:mod:`.blip_lazy`): ``--tokens lazy`` indexing against first stage only, and the first
  query over uncached candidates, the same query again, and one whose candidates are half cached.
* **load**: the 1/5/15-minute load average at the start and the end (a shared CPU's figures
  drift with it; the CPU-time ratios much less).

Nothing here imports pymilvus or open_clip: it runs on a machine with only torch and transformers.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .images import generate_images
from .ranking import agreement
from .timing import clock, figure, median, summary, sync

log = logging.getLogger(__name__)

QUERY = "a small red circle left of a large blue square"
STORAGES = ("fp16", "int8")
RANDOM_NOTE = "random weights: timing only, agreement figures not meaningful"


@dataclass(frozen=True)
class BlipSizes:
    model: str  # the random checkpoint built when none is given: base | tiny
    candidates: int  # reranked per query (the DESIGN figure: 100)
    images: int  # indexed (>= candidates); the first ``candidates`` are reranked
    batch: int  # images per forward, at index time and when re-encoding alike (same tokens)
    rounds: int  # samples of the cached path per option
    reencode_rounds: int  # samples of re-encoding from preprocessed pixels (minutes each on a CPU)
    workers: int  # decoding workers of the index runs
    low_res: int  # the lower input resolution (pixels); skipped unless below the checkpoint's
    # Re-encoding from the files timed as one call; else (CPU) as the sum of its separately timed
    # steps, decode + preprocess and the vision model on pixels, to save minutes of identical work.
    reencode_files: bool = True
    warmup: bool = True  # an untimed call of each path first (pointless for calls of seconds)
    identity_candidates: int = 0  # scores recomputed from re-encoded tokens for the identity check; 0: all
    sweep_candidates: int = 8  # candidates per point of the folded/standard break-even sweep
    sweep_tokens: tuple[int, ...] = (8, 16, 32, 48, 64, 96)  # query lengths of the sweep
    sweep_rounds: int = 2  # after an untimed call of each path; the fastest round counts
    parity_images: int = 4
    min_side: int = 256
    max_side: int = 640


def sizes_for(device: str, quick: bool) -> BlipSizes:
    if quick:
        return BlipSizes("tiny", candidates=8, images=12, batch=4, rounds=3, reencode_rounds=2, workers=0, low_res=16,
                         parity_images=3, min_side=48, max_side=96, sweep_tokens=(4, 8, 16))
    if device.startswith("cuda"):
        import os

        return BlipSizes("base", candidates=100, images=600, batch=50, rounds=30, reencode_rounds=8,
                         workers=min(8, max(1, (os.cpu_count() or 2) // 2)), low_res=224, sweep_candidates=100, sweep_rounds=10)
    # CPU: for BLIP-base on 2 cores re-encoding 100 images at 384 px takes minutes and even the
    # cached path 15-25 s (the text side projects every cached token to keys and values in each of its
    # 12 cross-attention layers), so each path is timed once; decoding stays in-process (the
    # forward needs both cores).
    return BlipSizes("base", candidates=100, images=100, batch=25, rounds=1, reencode_rounds=1, workers=0, low_res=224,
                     reencode_files=False, warmup=False, identity_candidates=10)


class _CacheFolder:
    """The one part of a store a reranker reads: its cache folder (this suite runs without Milvus)."""

    def __init__(self, path: Path):
        self.path = path

    def cache_dir(self) -> Path:
        return self.path


def run(workdir: Path, device: str, quick: bool = False, *, checkpoint: str | None = None,
        sizes: BlipSizes | None = None) -> dict[str, Any]:
    """Run the suite in ``workdir`` with ``checkpoint`` (hub name or directory; None: a random
    one); returns its JSON section."""
    import torch

    from ..stages.rerankers.blip_itm import BlipItmReranker
    from .blip_index import first_stage, index_files
    from .blip_model import random_checkpoint

    load_start = os.getloadavg()
    sizes = sizes or sizes_for(device, quick)
    # (-h12: the base model's text side has BLIP's 12 heads; an older workdir holds an 8-head one)
    ckpt = checkpoint or str(random_checkpoint(workdir / f"blip-random-{sizes.model}{'-h12' if sizes.model == 'base' else ''}", sizes.model))
    paths = generate_images(workdir / f"blip-images-{sizes.images}-{sizes.min_side}-{sizes.max_side}", sizes.images,
                            min_side=sizes.min_side, max_side=sizes.max_side, seed=11)
    encoder, first_label = first_stage(device, quick=quick, batch_size=sizes.batch, workers=sizes.workers)
    geometry = BlipItmReranker(checkpoint=ckpt, device=device).geometry
    native, patch = geometry["native_size"], geometry["patch_size"]
    low = sizes.low_res if checkpoint is None else 224  # a real checkpoint: the published BLIP pretraining size
    resolutions = [native] + ([low] if low < native and low % patch == 0 else [])
    out: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu",
        "precision": _precision(device),
        "checkpoint": checkpoint or f"random BLIP-{sizes.model} ({'blip-itm-base-coco dimensions' if sizes.model == 'base' else 'tiny config'})",
        "weights": "as loaded from the checkpoint" if checkpoint else RANDOM_NOTE,
        "meaningful_agreement": checkpoint is not None,
        "first_stage": first_label,
        "query": QUERY,
        "candidates": sizes.candidates,
        "images_indexed": sizes.images,
        "batch": sizes.batch,
        "reference": f"fp16@{native}",
        "options": {},
        "reencode": {},
        "index": {},
        "compute": {},
    }
    cache_root = workdir / "blip-caches"
    shutil.rmtree(cache_root, ignore_errors=True)
    without = index_files(encoder, paths)  # the same first stage for every resolution: once
    reference: np.ndarray | None = None
    try:
        for res in resolutions:
            stages = {s: BlipItmReranker(checkpoint=ckpt, storage=s, image_size=res, device=device) for s in STORAGES}
            alt = None
            if res == native:  # the text side's other cross-attention path, on the same fp16 cache
                used = stages["fp16"].cross_attention_path(len(stages["fp16"].query_tokens(_query()).ids[0]))
                other = "standard" if used == "folded" else "folded"
                alt = BlipItmReranker(checkpoint=ckpt, storage="fp16", image_size=res, device=device, cross_attention=other)
            for stage in [*stages.values(), *([alt] if alt else [])]:
                stage.bind(encoder=encoder, store=_CacheFolder(cache_root))
                stage.warm_up()
            group = _resolution(stages, encoder, paths, sizes, without, alt=alt)
            out["index"][str(res)] = group["index"]
            out["reencode"][str(res)] = group["reencode"]
            out["compute"][str(res)] = _compute(stages["fp16"])
            if res == native:
                out["parity"] = _parity(stages["fp16"], group["pixels"], sizes, device)
                reference = group["scores"]["fp16"]
                out["fold"] = {**group["fold"], "break_even": _break_even(stages["fp16"], sizes, device, group["tokens"])}
                from .blip_lazy import lazy_rows

                out["lazy"] = lazy_rows(checkpoint=ckpt, device=device, encoder=encoder, paths=paths, candidates=sizes.candidates,
                                        image_size=res, eager_scores=group["scores"]["fp16"], workdir=workdir, query=_query(),
                                        folder_store=_CacheFolder,
                                        first_stage_scores=np.array([h.retrieval_score for h in _hits([""] * sizes.candidates)]))
            for storage, option in group["options"].items():
                option[f"agreement_vs_{out['reference']}"] = agreement(reference, group["scores"][storage])
                out["options"][f"{storage}@{res}"] = option
            del stages, group, alt
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    out["load_avg"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                       "what": "1/5/15-minute load average (`uptime`) of this machine at the start and end of the suite"}
    return out


def _precision(device: str) -> str:
    """What the stage computes in with precision "auto" on ``device``."""
    if not device.startswith("cuda"):
        return "fp32"
    import torch

    return "bf16 autocast" if torch.cuda.is_bf16_supported() else "fp16 autocast"


# ---- one input resolution: index, bytes, timing, scores ------------------------------------


def _resolution(stages: dict[str, Any], encoder: Any, paths: list[Path], sizes: BlipSizes, without: Any, *,
                alt: Any = None) -> dict[str, Any]:
    import torch

    from ..stages.base import batched
    from ..stages.rerankers.blip_itm import storage as codec
    from .blip_index import index_files

    main = stages["fp16"]
    side = main.image_side()  # every option at this resolution: same model, same tokens
    res = side.transform.size

    # index with BLIP tokens: fills every option's cache
    writers = {s: st.token_writer() for s, st in stages.items()}
    with_ = index_files(encoder, paths, image_side=side, writers=list(writers.values()))
    index = {
        "method": "encode_files (the indexing path of `mmr index` / `mmr cache build`) over image files, Milvus upsert "
                  f"left out; {sizes.workers} decoding workers, batch {sizes.batch}; with BLIP: its tokens written for "
                  f"{len(writers)} storage options ({', '.join(writers)})",
        "without_blip": without.report(),
        "with_blip": with_.report(),
        "throughput": figure(with_.images / with_.seconds, "img/s", "indexing without BLIP tokens", without.images / without.seconds,
                             ratio_is="with / without BLIP tokens"),
    }
    ids = with_.ids[: sizes.candidates]
    if not all(ids) or len(ids) < sizes.candidates:
        raise RuntimeError(f"bench blip: only {sum(map(bool, ids))} of {sizes.candidates} candidate images were indexed")
    options: dict[str, Any] = {}
    for s, w in writers.items():
        cache = w.cache
        items = len(cache)
        cache.close()  # the last connection closing checkpoints the WAL into the file
        info = stages[s].info()
        options[s] = {
            "storage": s, "image_size": res, "tokens": info["tokens"], "width": info["width"],
            "bytes_per_image": {"stage_info": info["bytes_per_image"], "cache_bytes_per_item": cache.bytes_per_item,
                                "file_bytes_per_item": round(cache.file_bytes() / items, 1)},
            "gb_per_100k_images": round(cache.file_bytes() / items * 100_000 / 1e9, 2),
        }

    hits = _hits(ids)
    retrieval = np.array([h.first_stage_image_score for h in hits], dtype=np.float64)
    itc, device = main.config.itc_weight, main.device
    cand = paths[: sizes.candidates]

    def preprocess() -> list[Any]:  # decode + BLIP's preprocessing, in the index run's batches
        return [torch.stack([side.transform(_decode(p)) for p in chunk]) for chunk in batched(cand, sizes.batch)]

    pixels = preprocess()
    if device.startswith("cuda"):
        pixels = [p.pin_memory() for p in pixels]  # as a DataLoader with pin_memory leaves them

    fresh: list[Any] = []  # the re-encoded tokens of the last call from pixels

    def reencode(batches: Any, *, keep_tokens: bool = False) -> np.ndarray:
        tokens = torch.cat([side.tokens(px) for px in batches])  # [n, P, W] on the device
        if keep_tokens:
            fresh[:] = [tokens]
        return main.itm_logits(_query(), tokens) + itc * retrieval

    def from_files() -> np.ndarray:
        return reencode(torch.stack([side.transform(_decode(p)) for p in chunk]) for chunk in batched(cand, sizes.batch))

    last: dict[str, np.ndarray] = {}  # each path's scores, from its last timed call

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call():
            last[name] = fn()
        return call

    cached = {f"cached_{s}": keep(s, lambda st=st: st.score(_query(), hits)) for s, st in stages.items()}
    if alt is not None:  # the other cross-attention path, interleaved with the rest
        cached["cached_fp16_alt"] = keep("fp16_alt", lambda: alt.score(_query(), hits))
    reads = {f"read_{s}": (lambda st=st: st.cached_tokens(ids)) for s, st in stages.items()}
    reencoders = {"vision_on_pixels": keep("unstored", lambda: reencode(pixels, keep_tokens=True))}
    if sizes.reencode_files:
        reencoders["decode_preprocess_vision"] = from_files
    samples, cpu_s = _timed({**cached, **reads}, reencoders, sizes, device)
    samples["decode_preprocess"] = _timed({"decode_preprocess": preprocess}, {}, replace(sizes, rounds=3, warmup=False), "cpu")[0]["decode_preprocess"]
    vision, decode = summary(samples["vision_on_pixels"]), summary(samples["decode_preprocess"])
    if sizes.reencode_files:
        with_decode = summary(samples["decode_preprocess_vision"])
    else:
        with_decode = {"n": min(vision["n"], decode["n"]), "p50_ms": round(vision["p50_ms"] + decode["p50_ms"], 4),
                       "method": "sum of the separately timed steps: decode_preprocess p50 + vision_on_pixels p50"}

    # scores: cached vs the re-encoded tokens stored in the same option (must be identical), and
    # vs the re-encoded tokens as they are (the option's own loss)
    # (on a CPU the scores of the first ``identity_candidates`` only: each text-side pass over all
    # of them costs as much as the timed call; the tokens of all are compared)
    tokens = fresh[0].float().cpu().numpy()
    k = sizes.identity_candidates or len(ids)
    tol = 1e-4 if device == "cpu" else 2e-3
    for s, st in stages.items():
        stored = codec.encode(tokens, s)
        cached_tokens = st.cached_tokens(ids)
        same = st.itm_logits(_query(), codec.decode(stored[:k], s, st.geometry["width"], device=device)) + itc * retrieval[:k]
        diff = float(np.abs(last[s][:k] - same).max())
        bound = tol * max(1.0, float(np.abs(same).max()))
        tokens_same = bool(np.array_equal(cached_tokens.view(np.uint16), stored.view(np.uint16)))  # bit for bit
        c = summary(samples[f"cached_{s}"])
        options[s].update({
            "cached": c,
            "cache_read": summary(samples[f"read_{s}"]),
            "speedup_vs_reencode_vision": figure(vision["p50_ms"], "ms p50", f"cached {s} tokens, p50", c["p50_ms"],
                                                 ratio_is="re-encoding (vision model on preprocessed pixels) / cached: the speed-up"),
            "speedup_vs_reencode_with_decode": figure(with_decode["p50_ms"], "ms p50", f"cached {s} tokens, p50", c["p50_ms"],
                                                      ratio_is="re-encoding (decode + preprocess + vision model) / cached: the speed-up"),
            **({"speedup_cpu_time": figure(median(cpu_s["vision_on_pixels"]), "CPU s", f"cached {s} tokens, CPU s",
                                           median(cpu_s[f"cached_{s}"]),
                                           ratio_is="CPU seconds of this process, re-encoding (vision on pixels) / cached: "
                                                    "the speed-up with other processes' load taken out")}
               if device == "cpu" else {}),
            "scores": {
                # a subset's scores count only with every candidate's tokens bit for bit the same
                "identical": diff <= bound and (tokens_same or k == len(ids)),
                "max_abs_diff_vs_reencoded_same_storage": diff,
                "tolerance": bound,
                "scores_compared": k,
                "cached_tokens_bit_identical_to_reencoded": tokens_same,
                "max_abs_diff_vs_reencoded_unstored": float(np.abs(last[s] - last["unstored"]).max()),
                "score_range": [float(last[s].min()), float(last[s].max())],
            },
        })
        if not options[s]["scores"]["identical"]:
            log.warning("bench blip: cached %s scores differ from re-encoded ones by %.3g (tolerance %.3g); tokens bit-identical: %s",
                        s, diff, bound, tokens_same)
    reencode_report = {
        "what": f"BLIP re-encoding the same {len(ids)} images per query, then the stage's text side: vision_on_pixels = "
                "pixels decoded and preprocessed before the clock (on the host); decode_preprocess_vision = from the files; "
                "decode_preprocess = that step alone (in-process, one thread)",
        "vision_on_pixels": vision,
        "decode_preprocess_vision": with_decode,
        "decode_preprocess": decode,
    }
    log.info("bench blip %d px: cached fp16 %.1f ms, re-encode %.1f ms (%.1f ms with decode)", res,
             options["fp16"]["cached"]["p50_ms"], vision["p50_ms"], with_decode["p50_ms"])
    fold = _fold(main, alt, samples, cpu_s, last, vision, len(ids), device) if alt is not None else None
    return {"index": index, "options": options, "reencode": reencode_report, "scores": {s: last[s] for s in stages}, "pixels": pixels,
            "fold": fold, "tokens": tokens}


def _fold(main: Any, alt: Any, samples: dict[str, list[float]], cpu_s: dict[str, list[float]], last: dict[str, np.ndarray],
          vision: dict[str, Any], n: int, device: str) -> dict[str, Any]:
    """The two cross-attention paths' cached reranks (the stage's pick and the other one, same
    fp16 cache, interleaved) against re-encoding, with the work each does per candidate."""
    L = int(main.query_tokens(_query()).ids.shape[1])
    used, other = main.cross_attention_path(L), alt.config.cross_attention
    compute = _compute(main)
    wall = {used: summary(samples["cached_fp16"]), other: summary(samples["cached_fp16_alt"])}
    cpu = {used: median(cpu_s["cached_fp16"]), other: median(cpu_s["cached_fp16_alt"])}
    paths = {}
    for p in (used, other):
        gmac = compute["text_side_gmac_per_candidate_by_path"][p]
        paths[p] = {
            "cached": wall[p],
            "ms_per_candidate": round(wall[p]["p50_ms"] / n, 3),
            "text_side_gmac_per_candidate": gmac,
            "gmac_per_s": round(gmac * n / (wall[p]["p50_ms"] / 1000), 1),
            "speedup_vs_reencode_vision": figure(vision["p50_ms"], "ms p50", f"cached fp16, {p} cross-attention, p50", wall[p]["p50_ms"],
                                                 ratio_is="re-encoding (vision model on preprocessed pixels) / cached: the speed-up"),
            **({"cpu_s": round(cpu[p], 3), "speedup_cpu_time": figure(median(cpu_s["vision_on_pixels"]), "CPU s", f"cached fp16, {p}, CPU s",
                                                                        cpu[p], ratio_is="CPU seconds, re-encoding / cached")}
               if device == "cpu" else {}),
        }
    return {
        "what": f"the stage's rerank of the {n} cached candidates (fp16 tokens) with each cross-attention path; re-encoding as "
                "in 'reencode' (vision model on preprocessed pixels, then the stage's own text side)",
        "query_tokens": L,
        "path_used": used,
        "fold_max_tokens": main.fold_max_tokens,
        "mac_break_even_tokens": compute["mac_break_even_tokens"],
        "vision_gmac_per_image": compute["vision_gmac_per_image"],
        "paths": paths,
        "standard_vs_folded": figure(wall["standard"]["p50_ms"], "ms p50", "folded, p50", wall["folded"]["p50_ms"],
                                     ratio_is="standard / folded: what folding saves"),
        "scores_max_abs_diff_between_paths": float(np.abs(last["fp16"] - last["fp16_alt"]).max()),
    }


def _break_even(stage: Any, sizes: BlipSizes, device: str, tokens: np.ndarray) -> dict[str, Any]:
    """Both cross-attention paths on the vision tokens of ``sweep_candidates`` candidates
    (``tokens``, [n, P, W]) for queries of ``sweep_tokens`` tokens: where folding stops paying
    here, against where its multiply-accumulates say. On a CPU by this process's CPU seconds
    (steadier than wall time on a shared CPU), the fastest of ``sweep_rounds`` after a warm-up."""
    import torch

    from ..query import Query
    from ..stages.rerankers.blip_itm.itm import text_macs

    k = min(sizes.sweep_candidates, len(tokens))
    x = torch.as_tensor(tokens[:k]).to(device)
    word = "red"  # one token in BERT's vocabulary and in the random checkpoints'
    rows, crossed = [], None
    for L in sizes.sweep_tokens:
        query = Query(" ".join([word] * max(1, L - 2)), None)  # [CLS] + words + [SEP]
        tokens = int(stage.query_tokens(query).ids.shape[1])
        calls = {p: (lambda p=p, q=query: stage.itm_logits(q, x, path=p)) for p in ("folded", "standard")}
        wall, cpu = _timed(calls, {}, replace(sizes, rounds=sizes.sweep_rounds, warmup=True), device)
        clock_of = cpu if device == "cpu" else wall
        t = {p: min(clock_of[p]) / k * 1000 for p in calls}
        macs = {p: _giga(text_macs(stage._text.geometry, tokens, stage.geometry["tokens"], p)) for p in calls}
        rows.append({"query_tokens": tokens, **{f"{p}_ms_per_pair": round(t[p], 3) for p in calls},
                     **{f"{p}_gmac_per_pair": macs[p] for p in calls}, "standard_over_folded": round(t["standard"] / t["folded"], 3)})
        if crossed is None and t["folded"] > t["standard"]:
            crossed = tokens
    return {
        "what": f"text side only, {k} candidates per point, both paths forced, fastest of {sizes.sweep_rounds} after a warm-up; "
                + ("this process's CPU time per pair" if device == "cpu" else "wall time per pair, synchronised"),
        "candidates": k,
        "rows": rows,
        "first_tokens_where_standard_wins": crossed,
        "fold_max_tokens": stage.fold_max_tokens,
        "mac_break_even_tokens": _compute(stage)["mac_break_even_tokens"],
    }


def _timed(calls: dict[str, Callable], reencoders: dict[str, Callable], sizes: BlipSizes,
           device: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved samples, (wall seconds, this process's CPU seconds) per name: every round times
    each of ``calls``; the first ``reencode_rounds`` rounds also each re-encoding path (right
    after them). CPU seconds don't count the time other processes held the cores, so their ratios
    hold on a shared CPU where single wall-clock samples minutes apart do not."""
    if sizes.warmup:  # allocations, kernel choice, page cache
        for fn in [*calls.values(), *reencoders.values()]:
            clock(fn, device)
    wall: dict[str, list[float]] = {k: [] for k in [*calls, *reencoders]}
    cpu: dict[str, list[float]] = {k: [] for k in wall}

    def sample(name: str, fn: Callable) -> None:
        c0 = time.process_time()
        wall[name].append(clock(fn, device)[0])
        cpu[name].append(time.process_time() - c0)

    for r in range(max(sizes.rounds, sizes.reencode_rounds if reencoders else 0)):
        if r < sizes.rounds:
            for name, fn in calls.items():
                sample(name, fn)
        if r < sizes.reencode_rounds:
            for name, fn in reencoders.items():
                sample(name, fn)
    return wall, cpu


def _compute(stage: Any) -> dict[str, Any]:
    """Multiply-accumulates per query and candidate from the model's config (analytic, not
    measured): what caching saves (the vision tower) and what every query still pays (the text
    side: with the standard cross-attention it projects all P cached tokens to keys and values in
    each layer; folded, its cost grows with the query's length instead)."""
    from ..stages.rerankers.blip_itm.itm import break_even_tokens, text_macs

    cfg = stage.model.config
    vc = cfg.vision_config
    g = stage._text.geometry
    P, L = stage.geometry["tokens"], int(stage.query_tokens(_query()).ids.shape[1])
    wv = vc.hidden_size
    vision = vc.num_hidden_layers * (4 * P * wv * wv + 2 * P * P * wv + 2 * P * wv * vc.intermediate_size) + (P - 1) * 3 * vc.patch_size ** 2 * wv
    text = {p: text_macs(g, L, P, p) for p in ("folded", "standard")}
    used = stage.cross_attention_path(L)
    return {
        "what": "analytic multiply-accumulates (G) from the config, not measured",
        "query_tokens": L,
        "cross_attention_path": used,
        "vision_gmac_per_image": _giga(vision),
        "text_side_gmac_per_candidate": _giga(text[used]),
        "text_side_gmac_per_candidate_by_path": {p: _giga(v) for p, v in text.items()},
        "of_which_cross_attention_kv_projection": _giga(2 * (g.layers - 1) * P * g.encoder_width * g.hidden) if used == "standard" else 0.0,
        "mac_break_even_tokens": break_even_tokens(g, P),
        "mac_ratio": round((vision + text[used]) / text[used], 2),  # re-encoding / cached work: the speed-up if time followed MACs
    }


def _giga(macs: int) -> float:
    """G of a count, to 4 significant digits (the tiny model's are a few hundred thousand)."""
    return float(f"{macs / 1e9:.4g}")


def _query() -> Any:
    from ..query import Query

    return Query(QUERY, None)


def _decode(path: Path):
    from ..decode import decode_image, read_regular_file

    return decode_image(read_regular_file(path))


def _hits(ids: list[str]) -> list[Any]:
    """Candidates as the first stage returns them (cosines descending; the values are synthetic)."""
    from ..types import Hit

    scores = np.sort(np.random.default_rng(0).uniform(0.2, 0.35, len(ids)))[::-1]
    return [Hit(id=i, path=f"/bench/{i}", score=float(s), retrieval_score=float(s), rank=r + 1)
            for r, (i, s) in enumerate(zip(ids, scores))]


# ---- parity with transformers ----------------------------------------------------------------


def _parity(stage: Any, pixels: list[Any], sizes: BlipSizes, device: str) -> dict[str, Any]:
    """The stage's ITM logits from freshly encoded tokens against transformers' own
    ``BlipForImageTextRetrieval`` forward (fp32 only: on CUDA the stage runs under autocast)."""
    import torch

    if device != "cpu":
        return {"measured": False, "why": f"the stage runs {_precision(device)} on {device}; parity (1e-4) is defined in fp32 "
                                          "on CPU (tests/integration/reranking/test_blip_itm.py checks it)"}
    px = torch.cat(pixels)[: sizes.parity_images]
    query = _query()
    q = stage.query_tokens(query)
    ours = stage.itm_logits(query, stage.image_side().tokens(px))
    with torch.inference_mode():
        ref = stage.model(input_ids=q.ids.expand(len(px), -1), attention_mask=q.mask.expand(len(px), -1),
                          pixel_values=px, use_itm_head=True).itm_score[:, 1].float().numpy()
    sync(device)
    return {"measured": True, "images": len(px), "precision": "fp32", "max_abs_diff_itm_logit": float(np.abs(ours - ref).max()),
            "against": "transformers BlipForImageTextRetrieval(input_ids, pixel_values, use_itm_head=True).itm_score[:, 1]"}
