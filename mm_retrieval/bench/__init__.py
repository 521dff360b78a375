"""Benchmarks (``mmr bench``): each figure measured side by side with what it is compared against.

Suites (one module each):

* ``encode``  -- indexing throughput through the real pipeline vs the bare open_clip forward pass;
* ``search``  -- our search stage vs a raw ``MilvusClient.search``; ANN recall@10 vs exact search;
* ``rerank``  -- our reranker's latency and cache bytes vs BLIP image-text matching;
* ``blip``    -- the BLIP reranker from cached tokens vs re-encoding the images, per storage option;
* ``quality`` -- first stage vs reranked Recall@K on held-out compositional captions;
* ``video``   -- video decoding (frames/s vs a bare decode), segments per minute vs true scenes, index
  time per hour of video (demo model, ViT-B-32), Milvus grouping search vs grouping in Python;
* ``scale``   -- indexing images/s in one process vs on Ray with 1 and 2 encoder actors, Ray's
  overhead per batch, and the rows/s one driver writes (the ceiling of a cluster run);
* ``cli``     -- how long `mmr` takes to refuse what it checks before loading a model (a bad filter,
  a table without 'path', another model than the collection's, a missing collection), each as a new
  process, vs `mmr --version` and a search that loads the model;
* ``photos``  -- decode throughput with file metadata (EXIF) on vs off, extraction per file, and the
  latency from a file copied into a watched folder (`mmr watch`) to it being searchable;
* ``dupes``   -- `mmr duplicates`: precision/recall of its groups on generated copies of photo-like
  shots (and distinct shots of the same subject), its time for 10k items, the hash's cost per photo;
* ``ocr``     -- `--ocr`: recall of an exact word and of a phrase (`--mode ocr`) on made images (signs
  rendered onto photo-like scenes, screenshots), OCR time per image, index throughput with OCR on vs off;
* ``probe``   -- per patch, a linear probe's accuracy reading the covering object's colour and shape on
  held-out compositional scenes, at each depth of the demo encoder (issue 25: where the reranker's
  memory should come from).

:func:`run_benchmarks` returns one JSON-serialisable document: the machine it ran on, each suite's
section, and the DESIGN.md section-4 targets judged from them (:mod:`.targets`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUITES = ("encode", "search", "rerank", "blip", "quality", "video", "scale", "cli", "photos", "dupes", "ocr", "probe")


def run_benchmarks(suites: tuple[str, ...] | list[str] = SUITES, *, device: str = "auto", quick: bool = False,
                   workdir: str | Path | None = None, blip: str | None = None) -> dict[str, Any]:
    """Run ``suites`` on ``device``; ``workdir`` keeps generated data between runs (default: a
    temporary folder, removed afterwards); ``blip``: the BLIP checkpoint of the ``blip`` suite (hub
    name or directory; default a random BLIP-base-sized one, timing only)."""
    import importlib

    from ..errors import InputError
    from . import machine, targets
    from .timing import resolve

    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise InputError(f"unknown benchmark suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    device = resolve(device)
    t0 = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-"))
        root = tmp
    else:
        root = Path(workdir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    info = machine.describe(device)
    options = {"blip": {"checkpoint": blip}}  # suite-specific arguments
    doc: dict[str, Any] = {"quick": quick, "machine": info, "suites": {}, "runs": {}}
    try:
        for name in suites:
            log.info("bench: suite %s on %s%s", name, device, " (quick)" if quick else "")
            started = time.perf_counter()
            module = importlib.import_module(f"{__name__}.{name}")
            section = module.run(root, device, quick=quick, **options.get(name, {}))
            section["suite_seconds"] = round(time.perf_counter() - started, 1)
            doc["suites"][name] = section
            doc["runs"][name] = _run_info(info, quick)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["targets"] = targets.judge(doc["suites"], doc["machine"])
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    return doc


def _run_info(info: dict[str, Any], quick: bool) -> dict[str, Any]:
    return {"date": info["date"], "commit": info["commit"], "load_avg_1m_at_start": info.get("load_avg_1m_at_start"),
            "device": info["device"], "quick": quick}


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from several runs (e.g. one suite per run): later runs' suites win. Each suite
    keeps the date, commit and load of its own run under ``runs``; targets are judged again."""
    from ..errors import InputError
    from . import targets

    if not docs:
        raise InputError("nothing to merge: give at least one benchmark JSON document")
    out: dict[str, Any] = {"quick": False, "machine": dict(docs[-1]["machine"]), "suites": {}, "runs": {}, "seconds": 0.0}
    for d in docs:
        if "suites" not in d or "machine" not in d:
            raise InputError("not a benchmark document (written by `mmr bench --out FILE`): missing 'suites'/'machine'")
        for name, section in d["suites"].items():
            out["suites"][name] = section
            out["runs"][name] = d.get("runs", {}).get(name) or _run_info(d["machine"], d.get("quick", False))
        out["quick"] = out["quick"] or bool(d.get("quick"))
        out["seconds"] += float(d.get("seconds", 0.0))
    out["suites"] = {k: out["suites"][k] for k in SUITES if k in out["suites"]}
    out["targets"] = targets.judge(out["suites"], out["machine"])
    return out
