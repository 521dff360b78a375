"""Timing helpers shared by the suites: device-aware clocks, percentiles, side-by-side figures.

Every figure the benchmarks report is measured *against* something in the same run (the bare
forward pass, a raw ``MilvusClient.search``, a peer model), because the machines these run on are
shared: absolute numbers drift with other people's load, ratios of interleaved measurements much
less. :func:`figure` builds that pairing so no suite can report a number without its reference.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def resolve(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (the rule every stage uses)."""
    from ..devices import resolve_device

    return resolve_device(device)


def sync(device: str) -> None:
    """Wait for queued CUDA work, so a clock read after it measures the work (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def clock(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p95/mean in milliseconds and the sample count. p95 with few samples is the max-ish
    sample (nearest rank), so report ``n`` with it."""
    ms = sorted(s * 1000.0 for s in seconds)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 4),
        "p95_ms": round(ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "min_ms": round(ms[0], 4),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def figure(value: float, unit: str, against: str, against_value: float, *, ratio_is: str = "value / against",
           **extra: Any) -> dict[str, Any]:
    """One reported figure with what it was measured against and the ratio between them."""
    ratio = value / against_value if against_value else float("nan")
    return {
        "value": _round(value), "unit": unit, "against": against, "against_value": _round(against_value),
        "ratio": _round(ratio), "ratio_is": ratio_is, **extra,
    }


def _round(x: float) -> float:
    if not math.isfinite(x):
        return x
    return round(x, 4) if abs(x) < 1000 else round(x, 1)


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, device: str, warmup: int = 1,
                after_round: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Run each callable once per round, in turn, ``rounds`` times; seconds per call by name.

    Interleaving means a burst of load from another process hits every candidate alike, so the
    ratio of their medians stays meaningful on a shared machine.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            clock(fn, device)
    out: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            out[name].append(clock(fn, device)[0])
        if after_round is not None:  # e.g. the next query: every candidate sees the same inputs per round
            after_round()
    return out
