"""DESIGN.md section 4, target by target, judged from the measured suites.

Every row says what was measured (with the number) and whether the target is met. A target whose
suite did not run says so; one that needs hardware this run did not have is "not measurable here".
A target is never reported as a result.
"""

from __future__ import annotations

import math
from typing import Any

MET, NOT_MET, NOT_HERE, NOT_RUN = "met", "not met", "not measurable here", "not run"


def _row(what: str, target: str, status: str, measured: str) -> dict[str, str]:
    return {"what": what, "target": target, "status": status, "measured": measured}


def judge(suites: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, str]]:
    """One row per DESIGN section-4 target."""
    return [
        _indexing(suites.get("encode")),
        _search_overhead(suites.get("search")),
        _recall(suites.get("search")),
        _vs_blip(suites.get("rerank")),
        _h100(suites.get("rerank"), machine),
        _cache(suites.get("rerank"), suites.get("quality")),
        _quality(suites.get("quality")),
    ]


def _indexing(enc: dict[str, Any] | None) -> dict[str, str]:
    what, target = "indexing throughput vs bare open_clip forward (same device)", ">= 0.9"
    if not enc:
        return _row(what, target, NOT_RUN, "")
    r = enc["ratio_median"]
    t = enc["throughput"]
    text = (f"{r:.2f} ({t['value']:.0f} vs {t['against_value']:.0f} img/s, {enc['model']}, batch {t['batch_size']}, "
            f"{t['workers']} workers, {enc['device']}, median of {t['pairs']} pairs)")
    ceiling = enc.get("cpu_ceiling")
    if ceiling:
        text += f"; 2-core CPU ceiling with perfect overlap {ceiling['ratio']:.2f}"
    return _row(what, target, MET if r >= 0.9 else NOT_MET, text)


def _search_overhead(search: dict[str, Any] | None) -> dict[str, str]:
    what, target = "search stage latency vs raw MilvusClient.search", "overhead <= 10%"
    if not search:
        return _row(what, target, NOT_RUN, "")
    parts, worst = [], -math.inf
    for res in search["results"]:
        if res["index_type"] != "AUTOINDEX":  # the product default
            continue
        for limit, lat in res["latency"].items():
            s, p = lat["store_vs_raw"]["overhead_pct"], lat["pipeline_vs_raw"]["overhead_pct"]
            worst = max(worst, s, p)
            parts.append(f"{res['vectors']:,} vectors, limit {limit}: store {s:+.1f}%, pipeline {p:+.1f}% "
                         f"(raw p50 {lat['raw_client']['p50_ms']:.1f} ms)")
    return _row(what, target, MET if worst <= 10 else NOT_MET, "; ".join(parts))


def _recall(search: dict[str, Any] | None) -> dict[str, str]:
    what, target = "ANN recall@10 vs exact numpy search", ">= 0.99"
    if not search:
        return _row(what, target, NOT_RUN, "")
    parts = [f"{r['index_type']} {r['vectors']:,}: {r['recall@10']:.3f}" for r in search["results"]]
    default = [r["recall@10"] for r in search["results"] if r["index_type"] == "AUTOINDEX"]
    status = MET if default and min(default) >= 0.99 else NOT_MET
    return _row(what, target, status, ", ".join(parts))


def _vs_blip(rr: dict[str, Any] | None) -> dict[str, str]:
    what, target = "rerank 100 candidates vs BLIP-ITM-base (same device)", ">= 20x faster"
    res = ((rr or {}).get("peer") or {}).get("results", {}).get("100") if rr else None
    if not rr:
        return _row(what, target, NOT_RUN, "")
    if not res or "speedup_vs_blip_itm" not in res:
        return _row(what, target, NOT_RUN, "100 candidates not run against the peer (quick mode)")
    full, pre = res["speedup_vs_blip_itm"], res["speedup_vs_blip_precomputed"]
    text = (f"{full['value']:.0f}x (ours {full['ours_p50_ms']:.1f} ms vs BLIP {full['blip_p50_ms']:.0f} ms p50, "
            f"BLIP n={res['blip_itm']['n']}, {rr['device']}); vs BLIP with precomputed vision features: {pre['value']:.0f}x")
    return _row(what, target, MET if full["value"] >= 20 else NOT_MET, text)


def _h100(rr: dict[str, Any] | None, machine: dict[str, Any]) -> dict[str, str]:
    what, target = "rerank 100 candidates on an H100, p50", "<= 5 ms"
    gpu = machine.get("gpu") or ""
    if "H100" not in gpu:
        lat = ((rr or {}).get("latency") or {}).get("100")
        here = f"; here ({machine.get('device')}{', ' + gpu if gpu else ''}): {lat['total']['p50_ms']:.1f} ms p50" if lat else ""
        return _row(what, target, NOT_HERE, "no H100 in this run" + here)
    lat = rr["latency"]["100"]["total"]
    return _row(what, target, MET if lat["p50_ms"] <= 5 else NOT_MET, f"{lat['p50_ms']:.2f} ms p50 ({gpu})")


def _cache(rr: dict[str, Any] | None, q: dict[str, Any] | None) -> dict[str, str]:
    what, target = "token cache per image", "<= 16 KiB at no loss of reranked R@1"
    if not rr and not q:
        return _row(what, target, NOT_RUN, "")
    parts, sizes = [], []
    if rr:
        lay = rr["cache_layouts"]["layouts"]["multi_query"]["memory_bytes_per_image"]
        sizes.append(lay["tensor"])
        parts.append(f"ViT-B-32 memory {lay['tensor']:,} B ({lay['on_disk']:,.0f} B on disk)")
    loss_known = False
    if q:
        c = q["cache"]
        sizes.append(c["bytes_per_image"])
        r16, r32 = c["reranked_fp16_cache"]["R@1"], c["reranked_fp32_memory"]["R@1"]
        loss_known = True
        parts.append(f"demo model {c['bytes_per_image']:,} B; reranked R@1 fp16 cache {r16:.3f} vs fp32 memory {r32:.3f}")
    if not loss_known:
        return _row(what, target, NOT_RUN, "; ".join(parts) + "; R@1 loss needs the quality suite")
    ok = max(sizes) <= 16 * 1024 and r16 >= r32
    return _row(what, target, MET if ok else NOT_MET, "; ".join(parts))


def _quality(q: dict[str, Any] | None) -> dict[str, str]:
    what, target = "held-out compositional: reranked R@1 - first-stage R@1", ">= +15 points, R@10 never worse"
    if not q:
        return _row(what, target, NOT_RUN, "")
    e = q["eval"]
    f, r = e["first_stage"], e["reranked"]
    text = (f"R@1 {f['R@1']:.3f} -> {r['R@1']:.3f} ({q['delta_R@1_points']:+.1f} pts), R@10 {f['R@10']:.3f} -> {r['R@10']:.3f} "
            f"({e['n_queries']} queries, gallery {e['gallery']}, {q['sizes']['n_train']} train images)")
    ok = q["delta_R@1_points"] >= 15 and r["R@10"] >= f["R@10"]
    return _row(what, target, MET if ok else NOT_MET, text)
