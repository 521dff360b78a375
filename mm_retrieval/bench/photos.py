"""Suite ``photos``: what a photo library's file metadata costs, and how soon a watched folder's
new file is searchable.

* **Decode throughput with metadata on vs off.** The decode step (read, hash, decode, EXIF
  orientation, the model's preprocessing: :class:`~mm_retrieval.decode.ImageFileDataset`) over
  phone-sized JPEGs that carry EXIF (date, GPS, camera, lens), with ``file_metadata`` on and off,
  interleaved round by round, on one torch thread as in a decoding worker; in wall time and in
  this process's CPU time (which other processes' load moves least). This is the step extraction
  (and the near-duplicate hash) is added to; the whole index run (decode + encoder forward +
  writes) only dilutes the difference, so this ratio is the stricter one. Target: >= 0.95 (issue 26).
* **Extraction per file.** :func:`~mm_retrieval.media_meta.image_meta` on an opened JPEG (the
  header parse it shares with decoding included), and a video's container tags
  (:func:`~mm_retrieval.video.container_meta`, which opens the container itself).
* **Watch latency.** :class:`~mm_retrieval.watch.FolderWatcher` with the tiny model: from a file
  copied into the folder to a search that finds it (a filter on its path), the debounce included.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from .timing import figure, interleaved, summary

TARGET_RATIO = 0.95


def _library(folder: Path, n: int, side: int) -> list[Path]:
    """``n`` photo-like JPEGs of ``side`` x 3/4 ``side`` pixels with a phone's EXIF."""
    import numpy as np
    from PIL import Image

    from ..testing.photos import exif_block
    from .images import make_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"IMG_{i:04d}.jpg"
        if not p.exists():
            exif = exif_block(taken=f"2024:{1 + i % 12:02d}:{1 + i % 28:02d} 12:{i % 60:02d}:00", offset="+02:00",
                              gps=(48.85 + i * 1e-3, 2.35, 35.0), make="Apple", model="iPhone 15 Pro",
                              lens="iPhone 15 Pro back triple camera 6.86mm f/1.78", orientation=1 + i % 8)
            Image.fromarray(make_image(rng, side, side * 3 // 4)).save(p, "JPEG", quality=90, exif=exif.tobytes())
        paths.append(p)
    return paths


def run(root: Path, device: str, *, quick: bool = False) -> dict[str, Any]:
    import open_clip
    from PIL import Image

    from ..decode import ImageFileDataset
    from ..media_meta import image_meta
    from ..testing.videos import make_video
    from ..video import container_meta

    work = root / "photos"
    n, side, rounds = (12, 640, 3) if quick else (48, 2016, 7)  # 2016 x 1512: a 3 MP phone photo
    paths = [str(p) for p in _library(work / f"library-{side}", n, side)]
    transform = open_clip.image_transform(224, is_train=False)  # ViT-B-32's preprocessing

    def decode_all(meta: bool) -> None:
        ds = ImageFileDataset(paths, transform, file_metadata=meta)
        for i in range(len(ds)):
            item = ds[i]
            assert item.decoded and (bool(item.meta) == meta), item.error

    cpu: dict[str, list[float]] = {"metadata_on": [], "metadata_off": []}

    def cpu_timed(meta: bool) -> None:
        t = time.process_time()
        decode_all(meta)
        cpu["metadata_on" if meta else "metadata_off"].append(time.process_time() - t)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 there): no idle OpenMP threads stalling
    try:
        times = interleaved({"metadata_on": lambda: cpu_timed(True), "metadata_off": lambda: cpu_timed(False)}, rounds, "cpu")
    finally:
        torch.set_num_threads(threads)
    on, off = statistics.median(times["metadata_on"]), statistics.median(times["metadata_off"])
    ratio = figure(n / on, "images/s", "the same decode step without metadata", n / off)
    # CPU seconds of this process: what another process's load changes least (wall time on a busy
    # 2-core machine moved the ratio by +-20 %); the warm-up round is left out.
    cpu_on, cpu_off = (statistics.median(cpu[k][-rounds:]) for k in ("metadata_on", "metadata_off"))
    ratio_cpu = figure(n / cpu_on, "images per CPU second", "the same decode step without metadata", n / cpu_off)

    data = [Path(p).read_bytes() for p in paths]
    per_file = []
    for _ in range(3 if quick else 10):
        for b in data:
            t = time.perf_counter()
            image_meta(Image.open(io.BytesIO(b)))
            per_file.append(time.perf_counter() - t)
    clip = work / "clip.mp4"
    if not clip.exists():
        make_video(clip, [("red", 2.0), ("blue", 2.0)], metadata={"creation_time": "2024-07-04T18:00:00Z",
                                                                  "location": "+48.8566+002.3522/"})
    per_video = []
    for _ in range(5 if quick else 20):
        t = time.perf_counter()
        meta = container_meta(clip)
        per_video.append(time.perf_counter() - t)
    assert meta.get("taken"), meta

    return {
        "images": n, "image_size": [side, side * 3 // 4], "rounds": rounds, "preprocess": "ViT-B-32 (224 px)",
        "decode_metadata_on_vs_off": ratio,
        "decode_metadata_on_vs_off_cpu": ratio_cpu,
        "decode_ms_per_image": {"metadata_on": round(on / n * 1000, 3), "metadata_off": round(off / n * 1000, 3)},
        "decode_cpu_ms_per_image": {"metadata_on": round(cpu_on / n * 1000, 3), "metadata_off": round(cpu_off / n * 1000, 3)},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "target_ratio": TARGET_RATIO,
        "extraction_per_image": summary(per_file),
        "extraction_per_video": summary(per_video),
        "watch": _watch_latency(work, repeats=2 if quick else 5),
    }


def _watch_latency(work: Path, *, repeats: int, debounce: float = 0.5) -> dict[str, Any]:
    """Seconds from a file copied into a watched folder to a search that finds it."""
    from ..pipeline import Pipeline
    from ..testing.images import make_image as colour_image
    from ..watch import FolderWatcher

    folder, spare = work / "watched", work / "incoming"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(spare, ignore_errors=True)
    colour_image(folder / "first.png", (200, 30, 30), seed=1)
    db = work / "watch.db"
    for f in work.glob("watch.db*"):
        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink()
    latencies = []
    with Pipeline(db=str(db), model="mmr-tiny", pretrained="none", device="cpu", encoder={"workers": 0}) as pipe:
        watcher = FolderWatcher(pipe, folder, debounce=debounce, max_delay=max(30.0, debounce), log=lambda line: None)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        try:
            _until(lambda: watcher.syncs >= 1, 300)
            for k in range(repeats):
                src = colour_image(spare / f"new-{k}.png", (20 + 40 * k, 120, 220 - 40 * k), seed=100 + k)
                dst = folder / src.name
                t = time.perf_counter()
                shutil.copy(src, dst)
                found = lambda: pipe.search("a picture", k=1, mode="image", filter=f'path == "{dst}"').hits  # noqa: E731
                _until(lambda: bool(found()), 120)
                latencies.append(time.perf_counter() - t)
        finally:
            stop.set()
            thread.join(timeout=60)
    return {"debounce_s": debounce, "repeats": repeats, "model": "mmr-tiny",
            "latency_s": [round(x, 3) for x in latencies], "median_s": round(statistics.median(latencies), 3),
            "median_after_debounce_s": round(statistics.median(latencies) - debounce, 3)}


def _until(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the watched file did not become searchable in time")
        time.sleep(0.05)


def summary_lines(p: dict[str, Any]) -> list[str]:
    """The suite's lines in ``mmr bench``'s summary."""
    r = p["decode_metadata_on_vs_off"]
    w = p["watch"]
    return [
        f"photos  decode with file metadata {r['value']:.1f} vs {r['against_value']:.1f} images/s without: ratio {r['ratio']:.3f} "
        f"(target >= {p['target_ratio']}; {p['images']} EXIF JPEGs {p['image_size'][0]}x{p['image_size'][1]}, median of {p['rounds']})",
        *([(f"        in CPU time: ratio {c['ratio']:.3f} ({p['decode_cpu_ms_per_image']['metadata_on']:.1f} vs "
            f"{p['decode_cpu_ms_per_image']['metadata_off']:.1f} ms per image; load average {p.get('load_avg_1m', '?')})")]
          if (c := p.get("decode_metadata_on_vs_off_cpu")) else []),
        f"        metadata extraction {p['extraction_per_image']['p50_ms']:.3f} ms per image (p50), "
        f"{p['extraction_per_video']['p50_ms']:.2f} ms per video (container opened)",
        f"        watch: a copied file searchable after {w['median_s']:.2f} s (median of {w['repeats']}, debounce {w['debounce_s']:g} s "
        f"included, {w['model']})",
    ]
