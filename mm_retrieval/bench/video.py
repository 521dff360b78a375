"""Suite ``video``: decoding videos, cutting them into moments, indexing them, and grouping search.

The videos are generated (H.264 .mp4, like a phone's): compositional scenes (the shapes and
colours the demo model was trained on) that change at known, random times, with a little noise
per frame like a camera. Each figure is measured against a reference in the same run:

* **decode**: :func:`mm_retrieval.video.sample_frames` (PyAV decodes every frame, keeps
  ``VideoConfig.fps`` per second, converts and preprocesses those) -- frames decoded per second and
  seconds of video per second -- against a bare PyAV decode loop over the same file (every frame
  decoded, none converted): what sampling and preprocessing add to decoding itself.
* **segments per minute** of video, from the demo model's embeddings, against the true scene
  changes per minute; and how many true changes a segment boundary finds (within 1.5 sample
  intervals).
* **index time per hour of video**: ``Pipeline.index`` of the video folder (decode, sample, encode,
  segment, upsert) with the demo model and with ViT-B-32 (random weights: the compute of trained
  ones), against ``sample_frames`` alone on the same files (the decode share). The collection is
  created before the clock, as in the ``encode`` suite.
* **grouping search**: one hit per video among many videos' segments -- Milvus'
  ``group_by_field="media_id"`` (what ``MilvusStore.search(group_by_media=True)`` sends) against
  searching the top ``candidates`` rows and grouping them in Python, interleaved query by query; and
  how often the Python way even finds ``k`` distinct videos among its candidates.

CPU here; the same command on CUDA (``mmr bench --suite video --device cuda``) uses larger sizes.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .search import VectorEncoder, _describe_index, synthetic
from .timing import clock, figure, interleaved, summary

log = logging.getLogger(__name__)

BOUNDARY_TOLERANCE = 1.5  # a true scene change counts as found when a segment starts within this many sample intervals


@dataclass(frozen=True)
class VideoSizes:
    videos: int  # generated files
    seconds: float  # each
    file_fps: int  # the files' frame rate (what the decoder decodes)
    side: int  # px, square frames
    scene_seconds: tuple[float, float]  # scene durations drawn uniformly from this range
    models: tuple[str, ...]  # "demo" (the shipped trained mmr-tiny) and/or open_clip names with random weights
    group_videos: int  # synthetic videos in the grouping collection
    group_segments: int  # segments per synthetic video
    rounds: int  # grouping latency samples per method
    k: int = 10
    candidates: int = 100  # the Python way groups this many first-stage rows (the search's default depth)


def sizes_for(device: str, quick: bool) -> VideoSizes:
    if quick:
        return VideoSizes(videos=1, seconds=12, file_fps=8, side=96, scene_seconds=(3, 5), models=("demo",),
                          group_videos=60, group_segments=8, rounds=5, k=5, candidates=20)
    if device.startswith("cuda"):
        return VideoSizes(videos=8, seconds=120, file_fps=30, side=480, scene_seconds=(4, 15), models=("demo", "ViT-B-32"),
                          group_videos=10_000, group_segments=24, rounds=60)
    return VideoSizes(videos=3, seconds=60, file_fps=24, side=256, scene_seconds=(4, 15), models=("demo", "ViT-B-32"),
                      group_videos=1000, group_segments=24, rounds=40)


def run(workdir: Path, device: str, quick: bool = False, sizes: VideoSizes | None = None) -> dict[str, Any]:
    """Run the suite in ``workdir``; returns its JSON section."""
    from ..video import VideoConfig

    sizes = sizes or sizes_for(device, quick)
    cfg = VideoConfig()
    folder = workdir / f"videos-{sizes.videos}x{sizes.seconds:g}s-{sizes.file_fps}fps-{sizes.side}px"
    t = time.perf_counter()
    files = _generate(folder, sizes)
    generate_s = time.perf_counter() - t
    video_seconds = sum(f["seconds"] for f in files)
    out: dict[str, Any] = {
        "device": device,
        "videos": {"files": len(files), "seconds_each": sizes.seconds, "file_fps": sizes.file_fps, "side_px": sizes.side,
                   "codec": files[0]["codec"], "scenes": sum(len(f["scenes"]) for f in files),
                   "scene_seconds": list(sizes.scene_seconds), "generated_in_s": round(generate_s, 1)},
        "video_config": cfg.to_dict(),
        "decode": _decode(files, cfg),
        "models": {},
    }
    for model in sizes.models:
        out["models"][model] = _index(workdir, folder, files, model, device, cfg, video_seconds)
        log.info("bench video: %s %s", model, out["models"][model]["index_s_per_video_hour"])
    shutil.rmtree(workdir / "video.db.mmr", ignore_errors=True)
    out["grouping"] = _grouping(workdir, sizes)
    return out


# ---- the videos ----------------------------------------------------------------------------------
def _generate(folder: Path, sizes: VideoSizes) -> list[dict[str, Any]]:
    """Write (or reuse) the videos; each with its scenes' true intervals."""
    import json

    from ..testing.videos import _codec_for, make_video

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".complete.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    rng = np.random.default_rng(0)
    files = []
    for v in range(sizes.videos):
        scenes, total = [], 0.0
        while total < sizes.seconds:
            d = min(float(rng.uniform(*sizes.scene_seconds)), sizes.seconds - total)
            scenes.append((_random_scene(rng), max(d, 1.0 / sizes.file_fps)))
            total += scenes[-1][1]
        path = folder / f"video{v:03d}.mp4"
        intervals = make_video(path, scenes, fps=sizes.file_fps, size=sizes.side, seed=v)
        files.append({"path": str(path), "seconds": intervals[-1][1], "scenes": intervals,
                      "codec": _codec_for(path, None), "frames": int(round(intervals[-1][1] * sizes.file_fps))})
    stamp.write_text(json.dumps(files))
    return files


def _random_scene(rng: np.random.Generator):
    from ..datasets import compositional as comp

    def obj():
        return comp.SceneObject(size=str(rng.choice(comp.SIZES)), colour=str(rng.choice(list(comp.COLOURS))),
                                shape=str(rng.choice(comp.SHAPES)))

    return comp.Scene(objects=(obj(), obj()), relation=str(rng.choice(comp.RELATIONS)))


# ---- decoding --------------------------------------------------------------------------------------
def _decode(files: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """Per file, alternating (so load from other processes weighs on all three): a bare decode
    loop; ``sample_frames`` keeping PIL images (decode + sampling + conversion); ``sample_frames``
    with ViT-B-32's 224 px preprocessing (what indexing with it does before the forward pass)."""
    from ..stages.encoders.open_clip import OpenClipEncoder
    from ..video import sample_frames

    vit = OpenClipEncoder({"model": "ViT-B-32", "pretrained": "none", "device": "cpu", "workers": 0}).image_transform
    bare_s = sample_s = prep_s = 0.0
    decoded = sampled = 0
    seconds = 0.0
    _bare_decode(files[0]["path"]), sample_frames(files[0]["path"], vit, cfg)  # warm-up: codec and transform set-up, file cache
    for f in files:
        s, n = clock(lambda: _bare_decode(f["path"]), "cpu")
        bare_s += s
        decoded += n
        s, got = clock(lambda: sample_frames(f["path"], _keep, cfg), "cpu")
        sample_s += s
        sampled += len(got.frames)
        prep_s += clock(lambda: sample_frames(f["path"], vit, cfg), "cpu")[0]
        seconds += f["seconds"]
    return {
        "frames_decoded": decoded, "frames_sampled": sampled, "video_seconds": round(seconds, 2),
        "decoded_frames_per_s": figure(decoded / sample_s, "frames/s", "bare PyAV decode of every frame (no conversion)", decoded / bare_s,
                                       ratio_is="sample_frames (decode, sample, convert to RGB) / bare decode"),
        "sampled_frames_per_s": round(sampled / sample_s, 2),
        "video_seconds_per_s": round(seconds / sample_s, 2),
        "with_vit_b_32_preprocess": {
            "video_seconds_per_s": round(seconds / prep_s, 2),
            "preprocess_ms_per_sampled_frame": round(1000 * max(0.0, prep_s - sample_s) / max(1, sampled), 3),
        },
        "sample_s": round(sample_s, 3), "bare_decode_s": round(bare_s, 3), "with_preprocess_s": round(prep_s, 3),
    }


def _keep(image: Any) -> Any:
    """sample_frames' transform when only decoding is timed: the RGB image as it comes."""
    return image


def _bare_decode(path: str) -> int:
    import av

    n = 0
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"  # as sample_frames decodes
        for _ in c.decode(stream):
            n += 1
    return n


# ---- indexing ---------------------------------------------------------------------------------------
def _encoder_spec(model: str) -> dict[str, Any]:
    if model == "demo":
        from ..demo import SHIPPED

        return {"model": str(SHIPPED / "encoder"), "workers": 0}
    return {"model": model, "pretrained": "none", "workers": 0}


def _index(workdir: Path, folder: Path, files: list[dict[str, Any]], model: str, device: str, cfg: Any,
           video_seconds: float) -> dict[str, Any]:
    from ..decode import item_id
    from ..pipeline import Pipeline
    from ..video import hash_file, sample_frames

    pipe = Pipeline(db=str(workdir / "video.db"), collection=f"video_{model.replace('-', '_').lower()}", device=device,
                    encoder=_encoder_spec(model))
    encoder = pipe.encoder
    encoder.warm_up()
    pipe.store.drop()
    create_s = clock(lambda: pipe.store.ensure_collection(encoder.info()), device)[0]
    index_s, report = clock(lambda: pipe.index(folder, progress=False), device)
    decode_s = sum(clock(lambda: sample_frames(f["path"], encoder.image_transform, cfg), "cpu")[0] for f in files)
    segments, found, changes = 0, 0, 0
    per_video = []
    for f in files:
        rows = pipe.store.query(f'media_id == "{item_id(hash_file(f["path"]))}"', ["start", "end"], 10_000)
        starts = sorted(r["start"] for r in rows)
        segments += len(rows)
        true = [a for a, _ in f["scenes"][1:]]  # scene changes (not the video's start)
        interval = 1.0 / cfg.fps
        hit = sum(any(abs(s - t) <= BOUNDARY_TOLERANCE * interval for s in starts[1:]) for t in true)
        found += hit
        changes += len(true)
        per_video.append({"segments": len(rows), "scenes": len(f["scenes"]), "changes_found": hit})
    pipe.store.drop()
    pipe.close()
    minutes = video_seconds / 60
    hours = video_seconds / 3600
    return {
        "encoder": _encoder_spec(model)["model"] if model != "demo" else "demo (shipped mmr-tiny, trained)",
        "weights": "trained (shipped)" if model == "demo" else "random (pretrained none): timing only",
        "indexed": report.indexed,
        "report_video": report.video,  # the run's own account: bounds used, videos and segments
        "failed": [str(x)[:200] for x in (report.failed or [])][:5],
        "create_collection_s": round(create_s, 3),
        "index_s": round(index_s, 3),
        "index_s_per_video_hour": figure(index_s / hours, "s per hour of video", "sample_frames alone on the same files (decode share)",
                                         decode_s / hours, ratio_is="index / decode-only"),
        "segments": segments,
        "segments_per_minute": figure(segments / minutes, "segments/min", "true scenes per minute of the generated videos",
                                      sum(len(f["scenes"]) for f in files) / minutes, ratio_is="segments / true scenes"),
        "scene_changes_found": {"found": found, "of": changes, "share": round(found / changes, 4) if changes else None,
                                "tolerance_s": round(BOUNDARY_TOLERANCE / cfg.fps, 3)},
        "per_video": per_video,
    }


# ---- grouping search -----------------------------------------------------------------------------------
def _grouping(workdir: Path, sizes: VideoSizes) -> dict[str, Any]:
    """Milvus group_by_field vs Python grouping over the top candidates, on synthetic segments
    (each video's segments near its own centre, as a real video's moments are)."""
    from ..pipeline import Pipeline

    n_videos, per = sizes.group_videos, sizes.group_segments
    pipe = Pipeline(db=str(workdir / "video-group.db"), collection=f"segments_{n_videos}x{per}", encoder=VectorEncoder())
    store = pipe.store
    store.drop()
    store.ensure_collection(VectorEncoder().info())
    centres = synthetic(n_videos, seed=3)
    rng = np.random.default_rng(4)
    dim = centres.shape[1]
    t = time.perf_counter()
    batch = []
    for v in range(n_videos):
        # noise of norm ~0.6 around a unit centre: a video's moments have cosine ~0.85 to its centre
        vecs = centres[v] + (0.6 / np.sqrt(dim)) * rng.standard_normal((per, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        vid = format(v, "032x")
        for s in range(per):
            batch.append({"id": format((v + 1) << 40 | s, "032x"), "vector": vecs[s], "path": f"/synthetic/video{v}.mp4",
                          "metadata": {}, "media_id": vid, "start": float(5 * s), "end": float(5 * s + 5), "frame": float(5 * s + 2)})
        if len(batch) >= 20_000:
            store.upsert(batch)
            batch = []
    if batch:
        store.upsert(batch)
    store.flush()
    insert_s = time.perf_counter() - t
    index_wait_s = clock(lambda: _wait_for_index(store, n_videos * per), "cpu")[0]
    index = _describe_index(store)
    queries = synthetic(max(sizes.rounds, 20), seed=5)
    k, cands = sizes.k, sizes.candidates
    state = {"i": 0}

    def q():
        return queries[state["i"] % len(queries)][None, :]

    def milvus():
        return store.search(q(), k, group_by_media=True)[0]

    def python():
        return _group_in_python(store.search(q(), cands)[0], k)

    def python_enough():  # k * segments per video rows always hold k videos: complete, at a price
        return _group_in_python(store.search(q(), k * per)[0], k)

    def plain():
        return store.search(q(), k)[0]

    samples = interleaved({"milvus_group_by": milvus, "python_over_candidates": python, "python_over_k_x_segments": python_enough,
                           "plain_search_k": plain},
                          sizes.rounds, "cpu", warmup=2, after_round=lambda: state.__setitem__("i", state["i"] + 1))
    stats = {name: summary(s) for name, s in samples.items()}
    # per-round ratios: each round runs every method on the same query back to back, so a burst of
    # load from other processes cancels out of its ratio (steadier than a ratio of medians)
    per_round = {other: round(float(np.median(np.array(samples["milvus_group_by"]) / np.array(samples[other]))), 4)
                 for other in ("python_over_candidates", "python_over_k_x_segments", "plain_search_k")}
    complete, milvus_complete, agree, distinct_plain = 0, 0, [], []
    for i in range(len(queries)):
        state["i"] = i
        m = [h.video_id or h.id for h in milvus()]
        p = python()
        complete += len(p) >= k
        milvus_complete += len(set(m)) >= k
        agree.append(len(set(m) & set(p)) / max(1, len(m)))
        distinct_plain.append(len({h.video_id or h.id for h in plain()}))
    store.drop()
    return {
        "rows": n_videos * per, "videos": n_videos, "segments_per_video": per, "dim": dim, "k": k, "candidates": cands,
        "insert_s": round(insert_s, 2), "index_wait_s": round(index_wait_s, 2), "index": index,
        "queries": len(queries),
        **stats,
        "milvus_vs_python": figure(stats["milvus_group_by"]["p50_ms"], "ms p50",
                                   f"top {cands} rows grouped in Python (best per video) p50", stats["python_over_candidates"]["p50_ms"],
                                   ratio_is="Milvus group_by_field / Python grouping (ratio of p50s)",
                                   median_of_round_ratios=per_round["python_over_candidates"]),
        "milvus_vs_python_complete": figure(stats["milvus_group_by"]["p50_ms"], "ms p50",
                                            f"top k x segments per video = {k * per} rows grouped in Python (always k videos) p50",
                                            stats["python_over_k_x_segments"]["p50_ms"],
                                            ratio_is="Milvus group_by_field / complete Python grouping (ratio of p50s)",
                                            median_of_round_ratios=per_round["python_over_k_x_segments"]),
        "milvus_group_by_vs_plain_search_k": per_round["plain_search_k"],
        "python_found_k_videos": round(complete / len(queries), 4),
        "milvus_found_k_videos": round(milvus_complete / len(queries), 4),
        "python_agrees_with_milvus": round(float(np.mean(agree)), 4),
        "distinct_videos_in_plain_top_k": round(float(np.mean(distinct_plain)), 2),
        "note": "python_found_k_videos / milvus_found_k_videos: share of queries that got k distinct videos (else the page "
                "shows fewer than k: Milvus Lite groups a bounded candidate pool too); distinct_videos_in_plain_top_k: what an "
                "ungrouped top k holds",
    }


def _wait_for_index(store: Any, rows: int, timeout_s: float = 120.0) -> None:
    """Milvus Lite builds the sealed segments' index in the background after a flush (searches
    meanwhile are brute force and compete with the build): wait until it covers every row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = store.client.describe_index(store.name, "vector") or {}
        if int(info.get("indexed_rows", 0)) >= rows and int(info.get("pending_index_rows", 0)) == 0:
            return
        time.sleep(0.5)
    log.warning("bench video: the index of %s still covers %s of %d rows after %.0f s", store.name,
                (store.client.describe_index(store.name, "vector") or {}).get("indexed_rows"), rows, timeout_s)


def _group_in_python(hits: list, k: int) -> list[str]:
    seen: list[str] = []
    for h in hits:
        key = h.video_id or h.id
        if key not in seen:
            seen.append(key)
            if len(seen) == k:
                break
    return seen


def summary_lines(v: dict[str, Any]) -> list[str]:
    """The suite's figures as text lines (for the terminal summary and RESULTS.md)."""
    d = v["decode"]
    lines = [f"video   {v['videos']['files']} x {v['videos']['seconds_each']:g} s {v['videos']['codec']} "
             f"{v['videos']['side_px']} px @ {v['videos']['file_fps']} fps, sampled at {v['video_config']['fps']:g} fps on {v['device']}: "
             f"decode {d['decoded_frames_per_s']['value']:,.0f} frames/s ({d['video_seconds_per_s']:,.1f} s of video per s) vs bare "
             f"decode {d['decoded_frames_per_s']['against_value']:,.0f} -> {d['decoded_frames_per_s']['ratio']:.2f}"]
    for name, m in v["models"].items():
        ix, sg = m["index_s_per_video_hour"], m["segments_per_minute"]
        lines.append(f"        {name}: index {ix['value']:,.0f} s per hour of video (decode alone {ix['against_value']:,.0f} s); "
                     f"{sg['value']:.1f} segments/min vs {sg['against_value']:.1f} true scenes/min; "
                     f"{m['scene_changes_found']['found']}/{m['scene_changes_found']['of']} scene changes found")
    g = v["grouping"]
    lines.append(f"        grouping {g['rows']:,} segments of {g['videos']:,} videos, k {g['k']}: Milvus group_by "
                 f"{g['milvus_group_by']['p50_ms']:.1f} ms vs Python over {g['candidates']} candidates "
                 f"{g['python_over_candidates']['p50_ms']:.1f} ms p50 -> {g['milvus_vs_python']['median_of_round_ratios']:.2f} "
                 f"(median per-query ratio; k videos found in {100 * g['milvus_found_k_videos']:.0f}% / "
                 f"{100 * g['python_found_k_videos']:.0f}% of queries); "
                 f"vs Python over {g['k'] * g['segments_per_video']} rows (always k) {g['python_over_k_x_segments']['p50_ms']:.1f} ms "
                 f"-> {g['milvus_vs_python_complete']['median_of_round_ratios']:.2f}")
    return lines

