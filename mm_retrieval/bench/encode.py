"""Suite ``encode``: indexing throughput against the bare open_clip forward pass.

Measured side by side on the same device, model and batch size:

* **pipeline**: ``Pipeline.index(folder)`` from image files on disk into Milvus Lite: read, hash,
  decode and preprocess in DataLoader workers, forward pass (with patch tokens), token-cache
  write, Milvus upsert. Model loading, the Milvus connection and creating the (empty) collection
  happen before the clock (one-off costs, not throughput; the creation time is reported).
* **bare forward**: ``model.encode_image`` on pre-decoded, pre-processed tensors already on the
  device, under the same autocast the encoder stage uses; as many images as the pipeline run.

The ratio pipeline/bare is the DESIGN target (>= 0.9: decoding overlaps compute). Each pipeline run
is paired with a bare run right before it, so load from other processes hits both. Worker count
and batch size are swept around the product defaults (``workers=2``, ``batch_size=64``); the suite
says which configuration was fastest, how 2 workers compare with ``workers=0`` and the pipeline with
the CPU ceiling it computes.

Starting the decoding workers (issue #30) is measured as **time to the first batch** (from the
``index()`` call to the first batch stored): in this process (its first run with workers, a
4-batch run timed apart from the sweep, starts the fork server; later runs reuse it) and in a
fresh process (``python`` start to first batch of a 4-batch run: what ``mmr index`` costs), and as
a **small run** (20 images, the ``mmr sync`` of a few new photos) in this process and in a fresh
one.

Model choice: on CUDA ``ViT-B-32`` (random weights); on CPU ``mmr-small`` (64 px input, random
weights), because ViT-B-32 runs at a few images/s on a 2-core CPU and the suite must finish in
minutes. With mmr-small, decoding a 256-640 px photo costs as much as the forward pass, which is
exactly the regime where overlap matters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import generate_images
from .timing import clock, figure, median

log = logging.getLogger(__name__)

BARE_BATCHES = 6  # batches per bare-forward measurement (one before and one after each pipeline run)


@dataclass(frozen=True)
class EncodeSizes:
    model: str
    images: int
    batch_size: int  # the headline configuration (the product default)
    workers: int
    repeats: int  # headline pipeline/bare pairs
    sweep_workers: tuple[int, ...]
    sweep_batch: tuple[int, ...]
    min_side: int = 256
    max_side: int = 640
    small_images: int = 20  # the small run (a sync of a few new photos)
    small_repeats: int = 3
    fresh_process: bool = True  # also time a run in a new process (cold start)


def sizes_for(device: str, quick: bool) -> EncodeSizes:
    if quick:
        return EncodeSizes("mmr-tiny", images=16, batch_size=8, workers=0, repeats=1, sweep_workers=(), sweep_batch=(),
                           min_side=64, max_side=128, small_images=4, small_repeats=1, fresh_process=False)
    if device.startswith("cuda"):
        return EncodeSizes("ViT-B-32", images=2000, batch_size=64, workers=2, repeats=3, sweep_workers=(0, 1, 4, 8),
                           sweep_batch=(128, 256))
    return EncodeSizes("mmr-small", images=1000, batch_size=64, workers=2, repeats=3, sweep_workers=(0, 1, 3),
                       sweep_batch=(32, 128))


def run(workdir: Path, device: str, quick: bool = False, sizes: EncodeSizes | None = None) -> dict[str, Any]:
    """Run the suite in ``workdir``; returns its JSON section."""
    import torch

    sizes = sizes or sizes_for(device, quick)
    paths = generate_images(workdir / f"images-{sizes.images}-{sizes.min_side}-{sizes.max_side}", sizes.images,
                            min_side=sizes.min_side, max_side=sizes.max_side)
    folder = paths[0].parent
    db = workdir / "encode.db"
    threads = torch.get_num_threads()
    # On a CPU, encode_files runs torch on threads - workers threads while the workers decode (they
    # compete for the same cores otherwise); the "all_threads" runs keep all of torch's threads
    # (index_threads = threads: what indexing did before), for the gain.
    fewer = max(1, threads - sizes.workers) if device == "cpu" else threads
    head = dict(batch=sizes.batch_size, workers=sizes.workers, tokens=True, threads=threads)
    plan: list[tuple[str, dict[str, Any]]] = []
    for _ in range(sizes.repeats):  # headline and all-threads runs alternate: same load on both
        plan.append(("headline", head))
        if fewer != threads and not quick:
            plan.append(("all_threads", {**head, "index_threads": threads}))
    plan += [("sweep", {**head, "workers": w}) for w in sizes.sweep_workers]
    plan += [("sweep", {**head, "batch": b}) for b in sizes.sweep_batch]
    plan.append(("sweep", {**head, "tokens": False}))  # what the token-cache write costs

    runs = []
    four = generate_images(workdir / f"images-{4 * sizes.batch_size}-{sizes.min_side}-{sizes.max_side}",
                           4 * sizes.batch_size, min_side=sizes.min_side, max_side=sizes.max_side,
                           seed=2) if head["workers"] or sizes.fresh_process else []
    if head["workers"]:  # the first run with workers in this process starts them: timed on its own, off the sweep
        runs.append({"group": "start", **_pair(db, "enc_start", four[0].parent, len(four), sizes.model, device, **head)})
    for i, (group, cfg) in enumerate(plan):
        runs.append({"group": group, **_pair(db, f"enc_{i}", folder, len(paths), sizes.model, device, **cfg)})
        log.info("bench encode: %s", runs[-1])
    torch.set_num_threads(threads)
    shutil.rmtree(workdir / "encode.db.mmr", ignore_errors=True)

    heads = [r for r in runs if r["group"] == "headline"]
    ratio = median([r["ratio"] for r in heads])
    pipe_ips = median([r["pipeline_img_s"] for r in heads])
    bare_ips = median([r["bare_img_s"] for r in heads])
    costs = _decode_cost(paths[: min(64, len(paths))], sizes.model)
    decode_ms = costs["decode_ms"]
    # the indexing process's own CPU per image beyond the forward: writes (vectors, tokens), receiving batches
    fwd_ms = threads * 1000.0 / bare_ips if bare_ips > 0 else float("nan")
    # (with workers=0 that CPU holds the decoding too: then there is no such figure)
    main_other_ms = max(0.0, median([r["main_cpu_ms_per_image"] - r["forward_cpu_ms_per_image"] for r in heads])) \
        if heads[0]["workers"] else None
    out = {
        "model": sizes.model,
        "pretrained": "none (random weights, seeded)",
        "device": device,
        "images": len(paths),
        "image_sides_px": [sizes.min_side, sizes.max_side],
        "formats": "JPEG q90 (80%) and PNG (20%), photo-like (gradients, shapes, noise)",
        "decode_ms_per_image_one_process": decode_ms,
        "per_image_cpu_ms": {**costs, "forward_core_ms": round(fwd_ms, 3), "main_other_ms": None if main_other_ms is None else round(main_other_ms, 3),
                             "what": "decode_ms: read+decode+preprocess (the ceiling's decode); worker_ms: all a decoding "
                                     "worker does per image (read, sha256, decode, EXIF, near-duplicate hash, preprocess; "
                                     "1 torch thread), worker_ms_no_metadata without EXIF and hash; forward_core_ms: the "
                                     "bare forward's core time; main_other_ms: the indexing process's CPU per image in the "
                                     "headline runs minus the same bare forward's CPU on its torch threads (CPU time both: patch tokens, "
                                     "vector upsert, token write, receiving batches)"},
        "cpu_ceiling": _cpu_ceiling(device, bare_ips, decode_ms, costs["worker_ms"], main_other_ms),
        "throughput": figure(
            pipe_ips, "images/s", "bare open_clip forward on pre-decoded tensors (same device, model, batch)", bare_ips,
            ratio_is="pipeline / bare (median of per-pair ratios: %.4f)" % ratio,
            batch_size=sizes.batch_size, workers=sizes.workers, threads=threads, pairs=len(heads),
        ),
        "ratio_median": round(ratio, 4),
        "runs": runs,
    }
    out.update(_configurations(runs, heads, ratio, out["cpu_ceiling"]))
    out["first_batch"] = {
        "in_process_first_s": runs[0]["first_batch_s"],  # the first run with workers: it starts them (cold)
        "in_process_s": round(median([r["first_batch_s"] for r in heads]), 3),
        "in_process_workers0_s": next((r["first_batch_s"] for r in runs if r["workers"] == 0), None),
        "what": "seconds from the index() call to the first batch stored: the process's first run with workers "
                "(a 4-batch run, group 'start': it starts them), the headline runs (median), workers=0",
    }
    small = generate_images(workdir / f"images-{sizes.small_images}-{sizes.min_side}-{sizes.max_side}", sizes.small_images,
                            min_side=sizes.min_side, max_side=sizes.max_side, seed=1)
    out["small_run"] = _small_runs(db, small[0].parent, sizes, device, threads)
    if sizes.fresh_process:
        out["fresh_process"] = {
            f"{len(four)}_images": _fresh_process(workdir, four[0].parent, sizes, device),
            f"{len(small)}_images": _fresh_process(workdir, small[0].parent, sizes, device),
            "what": "`python` start to the first batch stored / to the end of index(), a new process each "
                    "(imports, Milvus Lite, model, decoding workers: what `mmr index` pays)",
        }
    out["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    before = [r for r in runs if r["group"] == "all_threads"]
    if before:
        gains = [h["pipeline_img_s"] / b["pipeline_img_s"] for h, b in zip(heads, before)]
        out["index_threads"] = {
            "threads": fewer, "default_threads": threads, "workers": sizes.workers,
            "pipeline_img_s": round(pipe_ips, 2),
            "all_threads_pipeline_img_s": round(median([b["pipeline_img_s"] for b in before]), 2),
            "all_threads_ratio": round(median([b["ratio"] for b in before]), 4),
            "gain": figure(median(gains), "x", f"the same pipeline keeping all {threads} torch threads while indexing", 1.0,
                           ratio_is=f"pipeline img/s with {fewer} / with {threads} threads, median of adjacent pairs"),
        }
    return out


def _pair(db: Path, collection: str, folder: Path, n: int, model: str, device: str, batch: int, workers: int,
          tokens: bool, threads: int, index_threads: int = 0) -> dict[str, Any]:
    """One bare-forward run, one pipeline run of the same images, one more bare run; throughputs.
    ``threads``: torch's (the bare forward's); ``index_threads``: the encoder's setting (0: default)."""
    import torch

    from ..pipeline import Pipeline
    from ..encoding import indexing_threads

    torch.set_num_threads(threads)
    pipe = Pipeline(db=str(db), collection=collection, device=device, cache_tokens=tokens,
                    encoder={"model": model, "pretrained": "none", "batch_size": batch, "workers": workers,
                             "index_threads": index_threads})
    encoder = pipe.encoder
    encoder.warm_up()
    pipe.store.drop()  # a fresh collection: nothing may count as "unchanged"
    # Creating it is a one-off cost (pymilvus polls index creation with 0.5 s sleeps), not
    # throughput: it happens before the clock, and is reported on its own.
    create_s = clock(lambda: pipe.store.ensure_collection(encoder.info()), device)[0]
    # Bare runs right before and right after the pipeline run, so load that changes during it
    # (other processes on a shared box) weighs on both sides alike.
    bare_n = min(n, BARE_BATCHES * batch)
    before = _bare_forward_seconds(encoder, folder, bare_n, batch, device)
    cpu0 = _self_cpu()
    pipe_s, first_s, report = _timed_index(pipe, folder, device)
    main_cpu = _self_cpu() - cpu0
    after = _bare_forward_seconds(encoder, folder, bare_n, batch, device)
    bare_ips = 2 * bare_n / (before + after)
    # the same forward on the pipeline's own torch threads, in CPU time: what of main_cpu is the forward
    fwd_n = min(bare_n, 3 * batch)
    torch.set_num_threads(indexing_threads(encoder, workers if n > batch else 0))
    fwd_cpu = _bare_forward_seconds(encoder, folder, fwd_n, batch, device, cpu=True)
    torch.set_num_threads(threads)
    if report.indexed != n:
        log.warning("bench encode: indexed %d of %d images (%s)", report.indexed, n, report.failed[:3])
    pipe.store.drop()  # frees the disk space of vectors and token caches
    return {
        "batch_size": batch, "workers": workers, "threads": threads, "index_threads": indexing_threads(encoder),
        "token_cache": tokens, "indexed": report.indexed,
        "pipeline_img_s": round(report.indexed / pipe_s, 2), "bare_img_s": round(bare_ips, 2),
        "bare_img_s_before_after": [round(bare_n / before, 2), round(bare_n / after, 2)],
        "ratio": round((report.indexed / pipe_s) / bare_ips, 4),
        "create_collection_s": round(create_s, 3),
        "first_batch_s": round(first_s, 3),
        "main_cpu_ms_per_image": round(main_cpu * 1000 / max(1, report.indexed), 3),  # this process, all its threads
        "forward_cpu_ms_per_image": round(fwd_cpu * 1000 / fwd_n, 3),  # bare, on the pipeline's threads
    }


def _self_cpu() -> float:
    """CPU seconds of this process (every thread: torch's, gRPC's), not of its workers."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_index(pipe: Any, folder: Path, device: str) -> tuple[float, float, Any]:
    """(seconds, seconds to the first batch stored, report) of ``pipe.index(folder)``."""
    first: list[float] = []
    start = time.perf_counter()
    seconds, report = clock(lambda: pipe.index(folder, progress=False, on_progress=lambda _: first or first.append(
        time.perf_counter())), device)
    return seconds, (first[0] - start if first else float("nan")), report


def _bare_forward_seconds(encoder: Any, folder: Path, n: int, batch: int, device: str, cpu: bool = False) -> float:
    """Seconds for ``n`` images through ``model.encode_image`` on device-resident tensors
    (``cpu``: this process's CPU seconds instead of wall time).

    One real batch is decoded and preprocessed up front and fed ``ceil(n / batch)`` times (the
    forward cost does not depend on pixel values), so memory stays at one batch.
    """
    import torch

    from ..decode import decode_image

    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))[:batch]
    pixels = torch.stack([encoder.image_transform(decode_image(p.read_bytes())) for p in files]).to(device)
    # The stage's own autocast choice (bf16/fp16 on CUDA, none on CPU), so both sides match.
    autocast = encoder.autocast
    full, rest = divmod(n, batch)
    chunks = [pixels] * full + ([pixels[:rest]] if rest else [])

    def forward():
        with torch.inference_mode(), autocast():
            for x in chunks:
                encoder.model.encode_image(x)

    with torch.inference_mode(), autocast():  # warm-up: first-call allocations and kernel selection
        encoder.model.encode_image(chunks[0])
    if cpu:
        start = _self_cpu()
        forward()
        return _self_cpu() - start
    return clock(forward, device)[0]


def _decode_cost(paths: list[Path], model: str) -> dict[str, float]:
    """CPU milliseconds per image in one process, on one torch thread (as in a decoding worker;
    CPU time, which other processes' load moves least; on a quiet machine it is the wall time the
    first runs measured): ``decode_ms`` to read, decode and preprocess (the CPU ceiling's figure),
    ``worker_ms`` and ``worker_ms_no_metadata`` for everything a decoding worker does
    (:class:`~mm_retrieval.decode.ImageFileDataset`, with and without file metadata: EXIF and the
    near-duplicate hash), each the better of two passes."""
    import torch

    from ..decode import ImageFileDataset, decode_image
    from ..stages.encoders.open_clip import OpenClipEncoder

    enc = OpenClipEncoder({"model": model, "pretrained": "none", "device": "cpu", "workers": 0})
    transform = enc.image_transform
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def per_image(fn: Any, clock_fn: Any) -> float:
            best = float("inf")
            for _ in range(2):
                t = clock_fn()
                fn()
                best = min(best, (clock_fn() - t) * 1000 / max(1, len(paths)))
            return round(best, 3)

        decode_ms = per_image(lambda: [transform(decode_image(p.read_bytes())) for p in paths], time.process_time)
        work = {}
        for meta in (True, False):
            ds = ImageFileDataset([str(p) for p in paths], transform, file_metadata=meta, uint8=True)  # as workers on a CPU
            work[meta] = per_image(lambda ds=ds: [ds[i] for i in range(len(ds))], time.process_time)
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": decode_ms, "worker_ms": work[True], "worker_ms_no_metadata": work[False]}


def _cpu_ceiling(device: str, bare_ips: float, decode_ms: float, worker_ms: float | None = None,
                 main_other_ms: float | None = None) -> dict[str, Any] | None:
    """On CPU, decoding and the forward pass share the same cores, so they cannot fully overlap:
    the best possible ratio is forward core-time / (forward + decode core-time) per image.

    ``with_per_image_work``: the same with all the per-image work an index run cannot skip, each
    measured in this run: the decoding worker's whole item (``worker_ms``: also the file's sha256,
    EXIF and near-duplicate hash) instead of the decode alone, plus the indexing process's CPU
    beyond the forward (``main_other_ms``: vector upsert, token write, receiving batches). Both
    are reported; the goal is stated against the first."""
    if device != "cpu" or not bare_ips > 0:
        return None
    import torch

    threads = torch.get_num_threads()
    forward_core_s = threads / bare_ips  # the bare forward keeps every intra-op thread busy
    ratio = forward_core_s / (forward_core_s + decode_ms / 1000.0)
    out: dict[str, Any] = {
        "ratio": round(ratio, 4), "torch_threads": threads,
        "why": "on a CPU the decoding workers take cores from the forward pass; this is the ratio with "
               "perfect overlap, computed from the measured bare throughput and decode cost",
    }
    if worker_ms is not None and main_other_ms is not None:
        extra = (worker_ms + main_other_ms) / 1000.0
        out["with_per_image_work"] = {
            "ratio": round(forward_core_s / (forward_core_s + extra), 4),
            "worker_ms": worker_ms, "main_other_ms": round(main_other_ms, 3),
            "what": "forward core-time / (forward + decoding worker's whole item + the indexing process's other "
                    "CPU) per image: the ceiling with the work every index run does (hashing, metadata, writes)",
        }
    return out


def _configurations(runs: list[dict[str, Any]], heads: list[dict[str, Any]], ratio: float,
                    ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """Which configuration indexed fastest (the default: the headline runs' median), 2 workers
    against none, and the pipeline against the CPU ceiling."""
    head_ips = median([r["pipeline_img_s"] for r in heads])
    configs = [({"batch_size": heads[0]["batch_size"], "workers": heads[0]["workers"], "default": True}, head_ips)]
    configs += [({"batch_size": r["batch_size"], "workers": r["workers"], "default": False}, r["pipeline_img_s"])
                for r in runs if r["group"] == "sweep" and r["token_cache"]]
    best, best_ips = max(configs, key=lambda c: c[1])
    out: dict[str, Any] = {"fastest": {**best, "pipeline_img_s": best_ips, "default_img_s": round(head_ips, 2),
                                       "default_is_fastest": best["default"]}}
    none = [r for r in runs if r["group"] == "sweep" and r["workers"] == 0 and r["token_cache"]]
    if none and heads[0]["workers"]:
        out["workers_vs_none"] = figure(head_ips, "images/s", "workers=0 (decoding in the indexing process)",
                                        none[0]["pipeline_img_s"], ratio_is=f"{heads[0]['workers']} workers / none",
                                        goal=1.5)
    if ceiling:
        out["of_cpu_ceiling"] = {"value": round(ratio / ceiling["ratio"], 4), "goal": 0.9,
                                 "what": "pipeline/bare ratio divided by the CPU ceiling's ratio"}
        if w := ceiling.get("with_per_image_work"):
            out["of_cpu_ceiling"]["of_ceiling_with_per_image_work"] = round(ratio / w["ratio"], 4)
    return out


def _small_runs(db: Path, folder: Path, sizes: EncodeSizes, device: str, threads: int) -> dict[str, Any]:
    """The default configuration indexing a few images into a fresh collection, in this process
    (model loaded, collection created before the clock), ``small_repeats`` times."""
    import torch

    from ..pipeline import Pipeline

    torch.set_num_threads(threads)
    seconds, firsts = [], []
    for i in range(sizes.small_repeats):
        pipe = Pipeline(db=str(db), collection=f"small_{i}", device=device,
                        encoder={"model": sizes.model, "pretrained": "none", "batch_size": sizes.batch_size,
                                 "workers": sizes.workers})
        pipe.encoder.warm_up()
        pipe.store.drop()
        pipe.store.ensure_collection(pipe.encoder.info())
        s, first, report = _timed_index(pipe, folder, device)
        seconds.append(s)
        firsts.append(first)
        pipe.store.drop()
    return {"images": sizes.small_images, "indexed": report.indexed, "seconds": round(median(seconds), 3),
            "decoded_in_process": sizes.small_images <= sizes.batch_size,  # one batch: workers could overlap nothing
            "first_batch_s": round(median(firsts), 3), "repeats": sizes.small_repeats,
            "batch_size": sizes.batch_size, "workers": sizes.workers,
            "what": "index() of a few new images in this process, default configuration (median)"}


_FRESH = """
import json, sys, time
from mm_retrieval import Pipeline

if __name__ == "__main__":
    folder, db, model, batch, workers, device = sys.argv[1:7]
    pipe = Pipeline(db=db, collection="fresh", device=device,
                    encoder={"model": model, "pretrained": "none", "batch_size": int(batch), "workers": int(workers)})
    first = []
    call = time.monotonic()
    report = pipe.index(folder, progress=False, on_progress=lambda _: first or first.append(time.monotonic()))
    end = time.monotonic()
    pipe.store.drop()
    print(json.dumps({"call": call, "first": first[0] if first else None, "end": end, "indexed": report.indexed}))
"""


def _fresh_process(workdir: Path, folder: Path, sizes: EncodeSizes, device: str) -> dict[str, Any]:
    """One index run of ``folder`` in a new Python process, default configuration: seconds from
    the process start to its first batch stored and to the end of ``index()`` (CLOCK_MONOTONIC is
    one clock for both processes)."""
    db = workdir / "fresh.db"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(folder), str(db), sizes.model, str(sizes.batch_size),
                           str(sizes.workers), device], check=False, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"bench encode: the fresh-process run failed: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(workdir / "fresh.db.mmr", ignore_errors=True)
    return {"images": got["indexed"], "to_first_batch_s": round(got["first"] - start, 3),
            "index_call_to_first_batch_s": round(got["first"] - got["call"], 3),
            "to_end_of_index_s": round(got["end"] - start, 3), "load_avg_1m": round(os.getloadavg()[0], 2)}
