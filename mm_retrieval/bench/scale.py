"""Suite ``scale``: indexing in one process vs on Ray (``mmr index --ray``), and what bounds a cluster.

Measured on this machine in one run, same images, model, batch size and collection kind:

* **single**: ``Pipeline.index(folder)``: :func:`~mm_retrieval.stages.base.encode_files`
  (DataLoader decoding workers overlapping the forward pass) in this process;
* **ray_1, ray_2**: ``Pipeline.index(folder, ray="local", ray_actors=N)``: the same images read,
  decoded and encoded by N encoder actors of a local Ray instance (each on ``cpus // N`` cores,
  decoding inline), the results streamed back to this process, which writes everything.
  Ray itself is started once, before the clock (``ray_start_s`` is reported apart); each run's
  actors load the model inside the run, as ``mmr index --ray`` does.

  Each run gives ``wall_img_s`` (the whole ``index`` call: planning, worker or actor start, last
  write) and ``steady_img_s`` (over the second half of the batches the driver received: the rate a
  long run approaches, without the one-off start or the batches actors finished ahead of it). Runs are interleaved (single, ray_1, ray_2, single, ...)
  so load from other processes hits every mode alike; medians are reported.
* **Ray's overhead per batch**: a pass-through actor that returns, for each batch of paths, a
  table shaped like the encoder actor's (vector and token bytes of the real sizes) without reading
  or computing anything, run through the same Ray Data pipeline as ``--ray`` (one block per batch,
  an actor pool, ordered results, :func:`~mm_retrieval.distributed.dataset.unpack` on the driver),
  against calling the same actor and ``unpack`` directly in this process: the difference per batch
  is what Ray adds (scheduling, object store, transfer). Also reported: ``ray_1`` minus ``single``
  per batch from the steady rates (overhead plus the decode/encode overlap a single actor lacks).
* **driver writes**: the ceiling one driver puts on any cluster, since every write goes through
  it: ``MilvusStore.upsert`` of rows shaped like ViT-B-32's (512-d image and text vectors, path,
  caption, metadata) in the indexer's batches, into Milvus Lite and into a ``milvus-lite server``
  on 127.0.0.1 (the server code path), and the token-cache commit of ViT-B-32's raw patch tokens
  (49 x 768 fp16 = 75 KB per image), each alone and both as an index run does them.

Model on CPU: ``mmr-small`` (64 px input, random weights) and 256-640 px JPEG/PNG files, as the
``encode`` suite (decoding costs about as much as the forward pass); ``--quick``: ``mmr-tiny``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .images import generate_images
from .timing import figure, median

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleSizes:
    model: str
    images: int
    batch_size: int
    workers: int  # decoding workers of the single-process runs (the product default: 2)
    rounds: int  # interleaved rounds of (single, ray_1, ray_2)
    actors: tuple[int, ...]
    noop_batches: int  # batches through the pass-through pipeline
    write_rows: int  # rows per driver-write measurement
    min_side: int = 256
    max_side: int = 640
    server: bool = True  # also measure driver writes into a milvus-lite server


def sizes_for(device: str, quick: bool) -> ScaleSizes:
    if quick:
        return ScaleSizes("mmr-tiny", images=24, batch_size=8, workers=0, rounds=1, actors=(1, 2), noop_batches=12, write_rows=128,
                          min_side=64, max_side=128, server=False)
    if device.startswith("cuda"):
        return ScaleSizes("ViT-B-32", images=2000, batch_size=64, workers=4, rounds=2, actors=(1, 2), noop_batches=200, write_rows=4096)
    return ScaleSizes("mmr-small", images=1280, batch_size=64, workers=2, rounds=2, actors=(1, 2), noop_batches=200, write_rows=2048)


def run(workdir: Path, device: str, quick: bool = False, sizes: ScaleSizes | None = None) -> dict[str, Any]:
    """Run the suite in ``workdir``; returns its JSON section (only ``skipped`` without Ray, so
    that ``mmr bench`` runs every other suite without the ``ray`` extra)."""
    from ..distributed import connect, require_ray
    from ..errors import MissingDependencyError

    try:
        require_ray()
    except MissingDependencyError as e:
        return {"skipped": str(e)}
    sizes = sizes or sizes_for(device, quick)
    paths = generate_images(workdir / f"images-{sizes.images}-{sizes.min_side}-{sizes.max_side}", sizes.images,
                            min_side=sizes.min_side, max_side=sizes.max_side)
    folder = paths[0].parent
    t = time.perf_counter()
    cluster = connect("local")  # started once: every --ray run below reuses it
    ray_start_s = time.perf_counter() - t
    try:
        runs = []
        for r in range(sizes.rounds):
            for mode in ["single", *(f"ray_{n}" for n in sizes.actors)]:
                runs.append({"round": r, **_index_run(workdir, folder, len(paths), sizes, device, mode)})
                log.info("bench scale: %s", runs[-1])
        overhead = _noop_overhead(sizes, paths)
    finally:
        cluster.close()
    writes = _driver_writes(workdir, sizes)

    by_mode = {m: [x for x in runs if x["mode"] == m] for m in dict.fromkeys(x["mode"] for x in runs)}
    med = {m: {k: round(median([x[k] for x in xs]), 2) for k in ("wall_img_s", "steady_img_s", "first_batch_s", "wall_s")}
           for m, xs in by_mode.items()}
    single = med["single"]
    ratios = {}
    for m in med:
        if m == "single":
            continue
        ratios[f"{m}_vs_single"] = figure(med[m]["steady_img_s"], "images/s", "single process, steady rate (same images, model, batch)",
                                          single["steady_img_s"], ratio_is=f"{m} / single, steady img/s (medians of {sizes.rounds} rounds)",
                                          wall_ratio=round(med[m]["wall_img_s"] / single["wall_img_s"], 4))
    if "ray_1" in med and "ray_2" in med:
        ratios["ray_2_vs_ray_1"] = figure(med["ray_2"]["steady_img_s"], "images/s", "ray with 1 actor, steady rate", med["ray_1"]["steady_img_s"],
                                          ratio_is="ray_2 / ray_1, steady img/s")
    bs = sizes.batch_size
    if "ray_1" in med:
        overhead["ray_1_minus_single_ms_per_batch"] = round(1000.0 * bs * (1 / med["ray_1"]["steady_img_s"] - 1 / single["steady_img_s"]), 2)
    import ray

    return {
        "model": sizes.model, "pretrained": "none (random weights, seeded)", "device": device, "images": len(paths),
        "image_sides_px": [sizes.min_side, sizes.max_side], "batch_size": bs, "single_workers": sizes.workers,
        "cpus": os.cpu_count(), "ray": ray.__version__, "ray_start_s": round(ray_start_s, 2),
        "collection": "Milvus Lite file (the driver writes; actors never open it)",
        "throughput": med, "ratios": ratios, "overhead_per_batch": overhead, "driver_writes": writes, "runs": runs,
    }


# ---- index runs -----------------------------------------------------------------------------
def _index_run(workdir: Path, folder: Path, n: int, sizes: ScaleSizes, device: str, mode: str) -> dict[str, Any]:
    """One ``Pipeline.index`` of ``folder`` into a fresh collection; throughputs and batch arrivals."""
    from ..pipeline import Pipeline

    actors = int(mode.split("_")[1]) if mode.startswith("ray_") else None
    pipe = Pipeline(db=str(workdir / "scale.db"), collection=f"scale_{mode}", device=device,
                    encoder={"model": sizes.model, "pretrained": "none", "batch_size": sizes.batch_size, "workers": sizes.workers})
    pipe.encoder.warm_up()  # the driver's model: loaded before the clock in every mode
    pipe.store.drop()
    pipe.store.ensure_collection(pipe.encoder.info())  # a one-off cost, not throughput
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {} if actors is None else {"ray": "local", "ray_actors": actors}
    report = pipe.index(folder, progress=False, on_progress=lambda k: arrivals.append((time.perf_counter(), k)), **kwargs)
    wall = time.perf_counter() - t0
    if report.indexed != n:
        log.warning("bench scale: %s indexed %d of %d images (%s)", mode, report.indexed, n, report.failed[:3])
    first_t = arrivals[0][0]
    # Steady: the second half of the batches. Not from the first arrival: actors that started
    # early have batches done by then (Ray Data runs ahead of the driver), which would count
    # work done before the window.
    mid = len(arrivals) // 2
    later = sum(k for _, k in arrivals[mid + 1:])
    steady = later / (arrivals[-1][0] - arrivals[mid][0]) if len(arrivals) > 2 else float("nan")
    pipe.store.drop()
    pipe.close()
    shutil.rmtree(workdir / "scale.db.mmr", ignore_errors=True)
    return {"mode": mode, "actors": actors, "indexed": report.indexed, "batches": len(arrivals), "wall_s": round(wall, 3),
            "wall_img_s": round(report.indexed / wall, 2), "steady_img_s": round(steady, 2), "first_batch_s": round(first_t - t0, 3)}


# ---- Ray's own cost per batch -------------------------------------------------------------------
class PassThroughActor:
    """For a batch of ``(pos, path)`` rows, the table :class:`~mm_retrieval.distributed.actors.EncoderActor`
    returns (same columns, vector and token bytes of the real sizes), computed from nothing."""

    def __init__(self, dim: int, token_shape: tuple[int, int]):
        rng = np.random.default_rng(0)
        self.vector = rng.standard_normal(dim).astype(np.float32).tobytes()
        self.tokens = rng.standard_normal(token_shape).astype(np.float16).tobytes()
        self.shape = list(token_shape)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        pos = batch.column("pos").to_pylist()
        n = len(pos)
        return pa.table({
            "pos": pa.array(pos, pa.int64()), "path": batch.column("path"),
            "id": pa.array([f"{p:032x}" for p in pos], pa.string()), "digest": pa.array([f"{p:064x}" for p in pos], pa.string()),
            "known": pa.array([False] * n, pa.bool_()), "decoded": pa.array([True] * n, pa.bool_()),
            "error": pa.array([None] * n, pa.string()),
            "vector": pa.array([self.vector] * n, pa.binary()), "tokens": pa.array([self.tokens] * n, pa.binary()),
            "token_shape": pa.array([self.shape] * n, pa.list_(pa.int64())), "token_dtype": pa.array(["float16"] * n, pa.string()),
        })


def _noop_overhead(sizes: ScaleSizes, paths: list[Path]) -> dict[str, Any]:
    """ms per batch: the pass-through actor through Ray Data (as ``--ray`` runs it) vs called directly."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from ..distributed.dataset import unpack

    dim, token_shape = 512, (49, 768)  # ViT-B-32's vector and raw patch tokens: what a cluster run moves
    bs, n_batches = sizes.batch_size, sizes.noop_batches
    names = [str(paths[i % len(paths)]) for i in range(bs * n_batches)]
    blocks = [pa.table({"pos": pa.array(range(i, i + bs), pa.int64()), "path": pa.array(names[i:i + bs], pa.string())})
              for i in range(0, len(names), bs)]
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True

    def through_ray() -> list[float]:
        ds = ray.data.from_arrow(blocks).map_batches(
            PassThroughActor, batch_size=bs, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=1,
            fn_constructor_kwargs={"dim": dim, "token_shape": token_shape}, udf_modifying_row_count=False,
        )
        stamps = []
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            unpack(table)
            stamps.append(time.perf_counter())
        return stamps

    stamps = through_ray()
    ray_ms = 1000.0 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)  # steady: after the pool's start
    actor = PassThroughActor(dim, token_shape)
    t = time.perf_counter()
    for b in blocks:
        unpack(actor(b))
    direct_ms = 1000.0 * (time.perf_counter() - t) / len(blocks)
    return {
        "batch_size": bs, "batches": len(stamps), "payload_bytes_per_image": dim * 4 + int(np.prod(token_shape)) * 2,
        "pass_through_via_ray_ms": round(ray_ms, 3), "pass_through_direct_ms": round(direct_ms, 3),
        "ray_ms": figure(ray_ms - direct_ms, "ms per batch", "the same pass-through actor and unpack called in the driver",
                         direct_ms, ratio_is="(via Ray - direct) / direct"),
        "ray_us_per_image": round(1000.0 * (ray_ms - direct_ms) / bs, 2),
    }


# ---- what one driver can write --------------------------------------------------------------------
def _driver_writes(workdir: Path, sizes: ScaleSizes) -> dict[str, Any]:
    """Rows/s one driver writes: vectors into Milvus (Lite, and a milvus-lite server), token rows
    into the token cache, and both as an index run interleaves them."""
    out: dict[str, Any] = {"rows": sizes.write_rows, "batch": 64, "dim": 512, "token_shape": [49, 768],
                           "token_bytes_per_row": 49 * 768 * 2}
    out["lite"] = _writes_into(str(workdir / "writes.db"), workdir / "writes-tokens", sizes.write_rows)
    if sizes.server:
        exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
        if Path(exe).exists():
            with _milvus_lite_server(exe, workdir / "writes-server") as uri:
                out["server"] = _writes_into(uri, workdir / "writes-server-tokens", sizes.write_rows)
    return out


def _writes_into(uri: str, token_dir: Path, n: int) -> dict[str, Any]:
    from .. import registry
    from ..stages.base import batched
    from ..tokencache import raw_token_writer

    rng = np.random.default_rng(0)
    dim = 512
    store = registry.create("store", "milvus", {"uri": uri, "collection": "writes"})
    store.warm_up()
    store.drop()
    store.ensure_collection({"stage": "bench", "model": "bench", "dim": dim, "fingerprint": "bench-writes"})
    shutil.rmtree(token_dir, ignore_errors=True)

    def rows(offset: int) -> list[dict[str, Any]]:
        return [{"id": f"{offset + i:032x}", "vector": rng.standard_normal(dim).astype(np.float32),
                 "text_vector": rng.standard_normal(dim).astype(np.float32) if i % 2 else None,
                 "path": f"/data/photos/{offset + i:08d}.jpg", "content_hash": f"{offset + i:064x}", "caption": f"caption {i}",
                 "metadata": {"year": 2000 + i % 20}, "file_size": 123456, "mtime_ns": 1} for i in range(n)]

    tokens = rng.standard_normal((64, 49, 768)).astype(np.float16)  # reused per batch: the values don't change the cost

    def upserts(batch_rows: list[dict[str, Any]]) -> float:
        t = time.perf_counter()
        for chunk in batched(batch_rows, 64):
            store.upsert(chunk)
        return time.perf_counter() - t

    def token_commits(writer: Any, batch_rows: list[dict[str, Any]]) -> float:
        t = time.perf_counter()
        for chunk in batched(batch_rows, 64):
            for j, r in enumerate(chunk):
                writer.add(r["id"], tokens[j])
            writer.commit()
        return time.perf_counter() - t

    vec_s = upserts(rows(0))
    writer = raw_token_writer(token_dir, "bench-writes")
    tok_s = token_commits(writer, rows(n))
    both_rows = rows(2 * n)
    t = time.perf_counter()
    for chunk in [both_rows[i:i + 64] for i in range(0, n, 64)]:  # as the indexer: tokens, then rows, per batch
        token_commits(writer, chunk)
        upserts(chunk)
    both_s = time.perf_counter() - t
    t = time.perf_counter()
    store.flush()
    flush_s = time.perf_counter() - t
    parquet_s = _parquet_seconds(store, rows(3 * n), token_dir / "parquet") if "://" in uri else None  # a server's only
    writer.cache.close()
    store.drop()
    store.close()
    shutil.rmtree(token_dir, ignore_errors=True)
    return {"uri": "milvus-lite server on 127.0.0.1" if "://" in uri else "Milvus Lite file",
            "vectors_rows_s": round(n / vec_s, 1), "token_rows_s": round(n / tok_s, 1), "token_mb_s": round(n * 49 * 768 * 2 / tok_s / 1e6, 1),
            "both_rows_s": round(n / both_s, 1), "flush_s": round(flush_s, 3),
            **({"bulk_parquet_rows_s": round(n / parquet_s, 1)} if parquet_s else {})}


def _parquet_seconds(store: Any, rows: list[dict[str, Any]], folder: Path) -> float | None:
    """Seconds to write ``rows`` as ``--bulk-dir`` does (the collection's schema read once, then
    the indexer's batches through :class:`~mm_retrieval.stages.stores.milvus_bulk.BulkImportStore`,
    closing the files), into a local folder: what the driver spends per row on a bulk import.
    None without the ``bulk`` extra (pymilvus' BulkWriter)."""
    from ..errors import MissingDependencyError
    from ..stages.stores.milvus_bulk import BulkImport, BulkImportConfig, require_bulk_writer
    from ..stages.base import batched

    try:
        require_bulk_writer()
    except MissingDependencyError:
        return None

    store.drop()  # a bulk import loads an empty collection
    store.ensure_collection({"stage": "bench", "model": "bench", "dim": 512, "fingerprint": "bench-writes"})
    bulk = BulkImport(BulkImportConfig(local_dir=str(folder)))
    t = time.perf_counter()
    writer = bulk.wrap(store)
    for chunk in batched(rows, 64):
        writer.upsert(chunk)
    writer.flush()
    seconds = time.perf_counter() - t
    shutil.rmtree(folder, ignore_errors=True)
    return seconds


class _milvus_lite_server:
    """``milvus-lite server`` on a free port of 127.0.0.1 for the duration of a ``with``."""

    def __init__(self, exe: str, data: Path):
        self.exe, self.data = exe, data

    def __enter__(self) -> str:
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(self.data / "server.log", "w")
        self.proc = subprocess.Popen([self.exe, "server", "--data-dir", str(self.data), "--host", "127.0.0.1", "--port", str(port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"milvus-lite server did not start: {(self.data / 'server.log').read_text()[-1000:]}")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def figure_lines(sc: dict[str, Any]) -> list[str]:
    """The suite's lines in ``mmr bench``'s summary and RESULTS.md."""
    if "skipped" in sc:
        return [f"scale   not run: {sc['skipped']}"]
    th, r, o = sc["throughput"], sc["ratios"], sc["overhead_per_batch"]
    lines = [f"scale   {sc['model']} on {sc['device']}, {sc['images']} images, batch {sc['batch_size']}, {sc['cpus']} CPUs, Ray {sc['ray']} "
             f"(started once in {sc['ray_start_s']} s)"]
    for mode, m in th.items():
        extra = ""
        if f"{mode}_vs_single" in r:
            extra = f" -> {r[f'{mode}_vs_single']['ratio']:.2f}x single (wall {r[f'{mode}_vs_single']['wall_ratio']:.2f}x)"
        lines.append(f"        {mode:<7} steady {m['steady_img_s']:.1f} img/s, wall {m['wall_img_s']:.1f} img/s "
                     f"(first batch after {m['first_batch_s']:.1f} s){extra}")
    if "ray_2_vs_ray_1" in r:
        lines.append(f"        2 actors vs 1: {r['ray_2_vs_ray_1']['ratio']:.2f}x")
    lines.append(f"        Ray per batch of {o['batch_size']} (pass-through actor, {o['payload_bytes_per_image']:,} B/img): "
                 f"{o['pass_through_via_ray_ms']:.1f} ms via Ray vs {o['pass_through_direct_ms']:.1f} ms direct -> "
                 f"{o['ray_ms']['value']:.1f} ms ({o['ray_us_per_image']:.0f} us/img)"
                 + (f"; ray_1 - single: {o['ray_1_minus_single_ms_per_batch']:.0f} ms/batch" if "ray_1_minus_single_ms_per_batch" in o else ""))
    for where in ("lite", "server"):
        if w := sc["driver_writes"].get(where):
            lines.append(f"        driver writes into {w['uri']}: vectors {w['vectors_rows_s']:,.0f} rows/s, token rows "
                         f"{w['token_rows_s']:,.0f} rows/s ({w['token_mb_s']:.0f} MB/s), both {w['both_rows_s']:,.0f} rows/s"
                         + (f"; bulk-import Parquet {w['bulk_parquet_rows_s']:,.0f} rows/s" if "bulk_parquet_rows_s" in w else ""))
    return lines
