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
        _decode_workers(suites.get("encode")),
        _search_overhead(suites.get("search")),
        _recall(suites.get("search")),
        _blip_speedup(suites.get("blip")),
        _blip_storage(suites.get("blip")),
        _blip_lazy(suites.get("blip")),
        _h100(suites.get("rerank"), suites.get("blip"), machine),
        _cache(suites.get("rerank"), suites.get("quality")),
        _quality(suites.get("quality")),
        _ray(suites.get("scale")),
        _cli_errors(suites.get("cli")),
        _cli_via_server(suites.get("search")),
        _photo_metadata(suites.get("photos")),
    ]


def _photo_metadata(photos: dict[str, Any] | None) -> dict[str, str]:
    what, target = "decode throughput with file metadata (EXIF, GPS, camera) vs without (issue 26)", ">= 0.95"
    if not photos:
        return _row(what, target, NOT_RUN, "")
    r = photos["decode_metadata_on_vs_off"]
    text = (f"{r['ratio']:.3f} ({r['value']:.1f} vs {r['against_value']:.1f} images/s, {photos['images']} EXIF JPEGs "
            f"{photos['image_size'][0]}x{photos['image_size'][1]}, median of {photos['rounds']} interleaved rounds)")
    return _row(what, target, MET if r["ratio"] >= photos["target_ratio"] else NOT_MET, text)


def _cli_errors(cli: dict[str, Any] | None) -> dict[str, str]:
    what, target = "CLI errors checkable without the model (bad filter, table columns, other model, missing collection)", "< 3 s each"
    if not cli:
        return _row(what, target, NOT_RUN, "")
    base = cli["cases"]["baseline_search_loads_model"]["median_s"]
    text = (f"slowest {cli['slowest_error_s']:.2f} s vs {base:.2f} s for a search that loads the model "
            f"(new process each, median of {cli['repeats']}, load average {cli.get('load_avg_1m_at_end')})")
    ok = cli["slowest_error_s"] < cli["target_s"] and cli["all_exit_2"]
    return _row(what, target, MET if ok else NOT_MET, text)


def _cli_via_server(search: dict[str, Any] | None) -> dict[str, str]:
    what, target = "`mmr search` (a new process) answered by a running `mmr serve` on the same database (issue 29)", "< 1 s"
    cv = (search or {}).get("cli_via_server")
    if not cv:
        return _row(what, target, NOT_RUN, "")
    via, loads = cv["via_server_s"]["p50_ms"] / 1000, cv["loads_model_s"]["p50_ms"] / 1000
    text = (f"{via:.2f} s p50 vs {loads:.2f} s loading the model (n={cv['via_server_s']['n']}, "
            f"load average {cv['load_avg_1m']:.1f})")
    return _row(what, target, MET if via < cv["target_s"] else NOT_MET, text)


def _ray(scale: dict[str, Any] | None) -> dict[str, str]:
    what, target = "--ray with 2 actors vs single process (same machine)", ">= 0.9 (Ray overhead only)"
    if not scale:
        return _row(what, target, NOT_RUN, "")
    r = scale["ratios"]["ray_2_vs_single"]
    text = (f"{r['ratio']:.2f} ({r['value']:.0f} vs {r['against_value']:.0f} img/s steady, {scale['model']}, "
            f"{scale['device']}, {scale['cpus']} CPUs; wall-clock ratio {r['wall_ratio']:.2f})")
    return _row(what, target, MET if r["ratio"] >= 0.9 else NOT_MET, text)


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


def _decode_workers(enc: dict[str, Any] | None) -> dict[str, str]:
    what = ("decoding workers (issue #30): their start (first batch with workers minus with workers=0, server "
            "running); 2 workers vs none; the default configuration the fastest")
    target = "< 1 s; >= 1.5x; yes"
    if not enc or "first_batch" not in enc:
        return _row(what, target, NOT_RUN, "")
    fb, fastest, vs = enc["first_batch"], enc["fastest"], enc.get("workers_vs_none")
    start = None if fb["in_process_s"] is None or fb["in_process_workers0_s"] is None else \
        fb["in_process_s"] - fb["in_process_workers0_s"]
    text = (f"{'n/a' if start is None else f'{start:.2f} s'} ({fb['in_process_s']} vs {fb['in_process_workers0_s']} s; "
            f"the process's first run, which starts the fork server: {fb['in_process_first_s']} s); "
            f"{vs['ratio'] if vs else 'n/a'}x; {'yes' if fastest['default_is_fastest'] else 'no'} "
            f"(fastest batch {fastest['batch_size']} workers {fastest['workers']})")
    ok = start is not None and start < 1.0 and vs is not None and vs["ratio"] >= 1.5 and fastest["default_is_fastest"]
    return _row(what, target, MET if ok else NOT_MET, text)


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


def _blip_speedup(blip: dict[str, Any] | None) -> dict[str, str]:
    what = "BLIP ITM: rerank 100 candidates from cached tokens vs re-encoding the 100 images (same device), identical scores"
    target = ">= 15x faster (CPU)"
    if not blip:
        return _row(what, target, NOT_RUN, "")
    if blip["candidates"] != 100:
        return _row(what, target, NOT_RUN, f"{blip['candidates']} candidates (quick mode)")
    ref = blip["options"][blip["reference"]]
    fast, slow = ref["speedup_vs_reencode_vision"], ref["speedup_vs_reencode_with_decode"]
    same = ref["scores"]["identical"]
    parts = [f"{blip['reference']}: {fast['ratio']:.1f}x vs the vision model on preprocessed pixels ({fast['against_value']:.0f} vs "
             f"{fast['value']:.0f} ms p50), {slow['ratio']:.1f}x vs decode + preprocess + vision ({slow['value']:.0f} ms); scores "
             f"{'identical' if same else 'NOT identical'} (max diff {ref['scores']['max_abs_diff_vs_reencoded_same_storage']:.1e})"
             + (f"; by this process's CPU time {ref['speedup_cpu_time']['ratio']:.1f}x" if "speedup_cpu_time" in ref else "")]
    parts += [f"{name} {o['speedup_vs_reencode_vision']['ratio']:.1f}x" for name, o in blip["options"].items() if name != blip["reference"]]
    if fold := blip.get("fold"):
        parts.append(f"cross-attention {fold['path_used']} for the {fold['query_tokens']}-token query; "
                     + ", ".join(f"{p} {x['speedup_vs_reencode_vision']['ratio']:.1f}x" for p, x in fold["paths"].items()))
    text = "; ".join(parts) + f" ({blip['device_name']}, {blip['precision']}, {blip['checkpoint']})"
    return _row(what, target, MET if same and fast["ratio"] >= 15 else NOT_MET, text)


def _blip_storage(blip: dict[str, Any] | None) -> dict[str, str]:
    what = "BLIP ITM cached tokens: parity with transformers; int8 bytes/image and top-10 agreement vs fp16"
    target = "parity 1e-4; int8 <= 450 KB/image with top-10 agreement >= 0.9"
    if not blip:
        return _row(what, target, NOT_RUN, "")
    native = blip["reference"].split("@", 1)[1]
    int8 = blip["options"].get(f"int8@{native}")
    if int8 is None:
        return _row(what, target, NOT_RUN, "no int8 option measured")
    parity = blip.get("parity") or {}
    agree = int8[f"agreement_vs_{blip['reference']}"]
    size = int8["bytes_per_image"]["cache_bytes_per_item"]
    text = "; ".join([
        f"parity {parity['max_abs_diff_itm_logit']:.1e} ({parity['precision']})" if parity.get("measured") else "parity not measured on this device",
        f"int8@{native} {size / 1000:.0f} KB/image ({int8['bytes_per_image']['file_bytes_per_item'] / 1000:.0f} KB in the cache file), "
        f"top-10 overlap {agree['top10_overlap']:.2f} (of {agree['k']}), Kendall tau {agree['kendall_tau']:.2f}",
    ])
    if not blip["meaningful_agreement"]:
        return _row(what, target, NOT_HERE, f"{text} ({blip['weights']}; agreement needs a real checkpoint: --blip Salesforce/blip-itm-base-coco)")
    ok = size <= 450_000 and agree["top10_overlap"] >= 0.9 and (not parity.get("measured") or parity["max_abs_diff_itm_logit"] <= 1e-4)
    return _row(what, target, MET if ok else NOT_MET, text)


def _blip_lazy(blip: dict[str, Any] | None) -> dict[str, str]:
    what, target = "BLIP lazy tokens (`mmr index --tokens lazy`): index throughput vs first stage only", ">= 0.9"
    lz = (blip or {}).get("lazy")
    if not lz:
        return _row(what, target, NOT_RUN, "")
    th = lz["index"]["throughput"]
    first, again, half = lz["first_query_uncached"], lz["same_query_again"], lz["half_cached"]
    text = (f"{th['ratio']:.2f} ({th['value']:.1f} vs {th['against_value']:.1f} img/s); {lz['candidates']} candidates: first query "
            f"(all uncached) {first['ms']:.0f} ms, again {again['ms']:.0f} ms, half cached {half['ms']:.0f} ms; encoded "
            f"{first['encoded']}/{again['encoded']}/{half['encoded']}; max |score - eager| "
            f"{max(first['max_abs_diff_vs_eager'], again['max_abs_diff_vs_eager'], half['max_abs_diff_vs_eager']):.1g}")
    if blip["candidates"] != 100:  # a few images: the run's one-off cache marking (a few fsyncs) is most of the time
        return _row(what, target, NOT_RUN, f"quick mode: {text}")
    return _row(what, target, MET if th["ratio"] >= 0.9 else NOT_MET, text)


def _h100(rr: dict[str, Any] | None, blip: dict[str, Any] | None, machine: dict[str, Any]) -> dict[str, str]:
    what, target = "rerank 100 candidates on an H100, p50", "<= 5 ms (our reranker), <= 20 ms (BLIP-base)"
    gpu = machine.get("gpu") or ""
    ours = ((rr or {}).get("latency") or {}).get("100", {}).get("total")
    theirs = blip["options"][blip["reference"]]["cached"] if blip and blip["candidates"] == 100 else None
    parts = ([f"ours {ours['p50_ms']:.2f} ms"] if ours else []) + ([f"BLIP {blip['reference']} cached {theirs['p50_ms']:.1f} ms"] if theirs else [])
    if "H100" not in gpu:
        here = f"; here ({machine.get('device')}{', ' + gpu if gpu else ''}): {', '.join(parts)} p50" if parts else ""
        return _row(what, target, NOT_HERE, "no H100 in this run" + here)
    if not parts:
        return _row(what, target, NOT_RUN, f"{gpu}: neither the rerank nor the blip suite ran at 100 candidates")
    ok = (ours is None or ours["p50_ms"] <= 5) and (theirs is None or theirs["p50_ms"] <= 20)
    missing = "" if ours and theirs else " (one of the two suites did not run)"
    return _row(what, target, MET if ok else NOT_MET, f"{', '.join(parts)} p50 ({gpu}){missing}")


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
