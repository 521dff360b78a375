"""Human-readable views of a benchmark document: a terminal summary and ``benchmarks/RESULTS.md``.

Both only format what the document holds; every number in them was measured in that run.
"""

from __future__ import annotations

from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _encode_start(enc: dict[str, Any]) -> list[str]:
    """The encode suite's configuration and start-up figures (issue #30), when the run has them."""
    lines = []
    if fa := enc.get("fastest"):
        lines.append(f"        fastest: batch {fa['batch_size']} workers {fa['workers']} ({_f(fa['pipeline_img_s'], 1)} img/s); "
                     f"default {_f(fa['default_img_s'], 1)} img/s: {'the fastest' if fa['default_is_fastest'] else 'NOT the fastest'}")
    if wv := enc.get("workers_vs_none"):
        lines.append(f"        {wv['ratio_is']}: {_f(wv['ratio'])}x ({_f(wv['against_value'], 1)} -> {_f(wv['value'], 1)} img/s; goal {wv['goal']}x)")
    if oc := enc.get("of_cpu_ceiling"):
        with_work = oc.get("of_ceiling_with_per_image_work")
        lines.append(f"        pipeline at {_f(oc['value'])} of the CPU ceiling (goal {oc['goal']})"
                     + (f"; at {_f(with_work)} of the ceiling with all per-image work" if with_work is not None else ""))
    if fb := enc.get("first_batch"):
        lines.append(f"        time to first batch in one process: {_f(fb['in_process_first_s'])} s (first run with workers), "
                     f"{_f(fb['in_process_s'])} s (later runs), {_f(fb['in_process_workers0_s'])} s (workers=0)")
    if sr := enc.get("small_run"):
        lines.append(f"        small run: {sr['images']} images in {_f(sr['seconds'])} s (first batch {_f(sr['first_batch_s'])} s, "
                     f"in one process, median of {sr['repeats']})")
    for name, fp in (enc.get("fresh_process") or {}).items():
        if isinstance(fp, dict):
            lines.append(f"        new process, {fp['images']} images: first batch {_f(fp['to_first_batch_s'])} s after `python` "
                         f"started ({_f(fp['index_call_to_first_batch_s'])} s after index()), done {_f(fp['to_end_of_index_s'])} s")
    return lines


def figures(doc: dict[str, Any]) -> list[str]:
    """One line per headline figure, each with what it was measured against."""
    s, lines = doc["suites"], []
    if enc := s.get("encode"):
        t = enc["throughput"]
        lines.append(f"encode  {enc['model']} on {enc['device']}: pipeline {_f(t['value'], 1)} img/s vs bare forward "
                     f"{_f(t['against_value'], 1)} img/s -> ratio {_f(enc['ratio_median'])} (batch {t['batch_size']}, {t['workers']} workers)")
        for r in enc["runs"]:
            lines.append(f"        {r['group']:<11} batch {r['batch_size']:>4} workers {r['workers']} threads {r['threads']}"
                         f"/{r.get('index_threads', r['threads'])} "
                         f"tokens {'on ' if r['token_cache'] else 'off'}: pipeline {_f(r['pipeline_img_s'], 1)} vs bare "
                         f"{_f(r['bare_img_s'], 1)} img/s -> {_f(r['ratio'])}")
        lines.append("        (threads: torch's for the bare forward / the pipeline's while indexing)")
        if it := enc.get("index_threads"):
            lines.append(f"        indexing on {it['threads']} instead of all {it['default_threads']} torch threads with {it['workers']} decode workers: "
                         f"pipeline {_f(it['gain']['value'])}x ({_f(it['all_threads_pipeline_img_s'], 1)} -> {_f(it['pipeline_img_s'], 1)} img/s)")
        if c := enc.get("cpu_ceiling"):
            lines.append(f"        decode {_f(enc['decode_ms_per_image_one_process'])} ms/img per process; best possible ratio on this CPU {_f(c['ratio'])}")
            if (w := c.get("with_per_image_work")) and (pc := enc.get("per_image_cpu_ms")):
                lines.append(f"        with all per-image work (worker {_f(w['worker_ms'])} ms: decode, sha256, EXIF, hash; "
                             f"without metadata {_f(pc['worker_ms_no_metadata'])} ms; indexing process beyond the forward "
                             f"{_f(w['main_other_ms'])} ms; forward {_f(pc['forward_core_ms'])} core-ms): best possible ratio {_f(w['ratio'])}")
        lines += _encode_start(enc)
    if se := s.get("search"):
        for r in se["results"]:
            head = f"search  {r['vectors']:>7,} {r['index_type']:<9} recall@10 {_f(r['recall@10'], 3)} vs exact numpy"
            if "recall@10_with_small_ef" in r:
                head += f" (ef={r['recall@10_with_small_ef']['ef']}: {_f(r['recall@10_with_small_ef']['recall@10'], 3)})"
            lines.append(head)
            for limit, lat in r["latency"].items():
                lines.append(f"        limit {limit:>3}: raw client p50 {_f(lat['raw_client']['p50_ms'])} ms | store {_f(lat['store']['p50_ms'])} ms "
                             f"({lat['store_vs_raw']['overhead_pct']:+.1f}%) | pipeline {_f(lat['pipeline']['p50_ms'])} ms "
                             f"({lat['pipeline_vs_raw']['overhead_pct']:+.1f}%); p95 raw/store/pipeline "
                             f"{_f(lat['raw_client']['p95_ms'])}/{_f(lat['store']['p95_ms'])}/{_f(lat['pipeline']['p95_ms'])} ms")
                if "has_collection_rpc" in lat:
                    lines.append(f"                   raw + our row filter {_f(lat['raw_client_with_store_filter']['p50_ms'])} ms; one "
                                 f"has_collection round trip {_f(lat['has_collection_rpc']['p50_ms'])} ms (no longer made per query)")
                if g := lat.get("store_now_vs_grouped_before"):
                    lines.append(f"                   no video, so no grouping: store p50 {_f(g['value'])} ms vs {_f(g['against_value'])} ms "
                                 f"grouped by video as before ({_f(g['ratio'])}x)")
        if cv := se.get("cli_via_server"):
            lines += _cli_via_server(cv)
            if "before_flush" in r:
                b = r["before_flush"]
                lines.append(f"        rows as upserted (growing segments) raw p50 {_f(b['raw_search_unflushed']['p50_ms'])} ms -> "
                             f"after MilvusStore.flush {_f(b['raw_search_flushed']['p50_ms'])} ms (flush {b['flush_s']} s){_later(b)} -> after "
                             f"release+load {_f(b['raw_search_flushed_reloaded']['p50_ms'])} ms ({b['release_load_s']} s)")
    if rr := s.get("rerank"):
        for n, lat in rr["latency"].items():
            lines.append(f"rerank  {n:>5} candidates: p50 {_f(lat['total']['p50_ms'])} ms p95 {_f(lat['total']['p95_ms'])} ms, "
                         f"{_f(lat['pairs_per_s'], 0)} pairs/s (text {_f(lat['text_encode']['p50_ms'])}, cache {_f(lat['cache_read']['p50_ms'])}, "
                         f"model {_f(lat['model']['p50_ms'])} ms)")
        if tt := rr.get("text_trim"):
            lines.append(f"        text tower on real tokens only ({tt['check']['positions'][0]} -> {tt['check']['positions'][1]} positions, "
                         f"max diff {tt['check']['max_abs_diff_embedding']:.1e}): text {_f(tt['text_gain']['ratio'])}x faster, "
                         f"rerank {_f(tt['rerank_gain']['ratio'])}x faster ({_f(tt['rerank_full_context']['p50_ms'])} -> {_f(tt['rerank']['p50_ms'])} ms)")
        from .token_read import summary_lines as token_read_lines

        lines += token_read_lines(rr)
        for n, res in rr["peer"]["results"].items():
            if "speedup_vs_blip_itm" not in res:
                continue
            a, b = res["speedup_vs_blip_itm"], res["speedup_vs_blip_precomputed"]
            lines.append(f"        vs BLIP-ITM at {n}: {_f(a['value'], 1)}x faster (BLIP {_f(a['blip_p50_ms'], 0)} ms, n={res['blip_itm']['n']}); "
                         f"vs BLIP precomputed vision: {_f(b['value'], 1)}x (BLIP {_f(b['blip_p50_ms'], 0)} ms)")
        for name, lay in rr["cache_layouts"]["layouts"].items():
            lines.append(f"        cache {name:<11} kv_heads {lay['kv_heads']}: memory {lay['memory_bytes_per_image']['tensor']:,} B/img; "
                         f"per-layer K/V would be {lay['per_layer_kv_bytes_per_image']['tensor']:,} B/img; "
                         f"model p50 {_f(lay['model_ms_at_candidates']['p50_ms'])} ms at {lay['model_ms_at_candidates']['candidates']}")
    if sc := s.get("scale"):
        from .scale import figure_lines

        lines += figure_lines(sc)
    if v := s.get("video"):
        from .video import summary_lines

        lines += summary_lines(v)
    if b := s.get("blip"):
        lines += _blip(b)
    if c := s.get("cli"):
        from .cli import summary_lines as cli_lines

        lines += cli_lines(c)
    if ph := s.get("photos"):
        from .photos import summary_lines as photo_lines

        lines += photo_lines(ph)
    if du := s.get("dupes"):
        from .dupes import summary_lines as dupes_lines

        lines += dupes_lines(du)
    if oc := s.get("ocr"):
        from .ocr import summary_lines as ocr_lines

        lines += ocr_lines(oc)
    if pr := s.get("probe"):
        from .probe import summary_lines as probe_lines

        lines += probe_lines(pr)
    if q := s.get("quality"):
        e = q["eval"]
        lines.append(f"quality first stage R@1/5/10 {'/'.join(_f(v, 3) for v in e['first_stage'].values())} vs reranked "
                     f"{'/'.join(_f(v, 3) for v in e['reranked'].values())} ({e['n_queries']} held-out queries, gallery {e['gallery']})")
        val = q["reranker"]["val"]
        lines.append(f"        reranker's own val split (training rows held out by --split-by): R@1 {_f(val['first_stage']['R@1'], 3)} -> "
                     f"{_f(val['reranked']['R@1'], 3)}, best epoch {q['reranker']['best_epoch']} of {q['reranker']['epochs_run']}")
        lines.append(f"        cache {q['cache']['bytes_per_image']:,} B/img {q['cache']['shape']} fp16: reranked R@1 "
                     f"{_f(q['cache']['reranked_fp16_cache']['R@1'], 3)} vs fp32 memory {_f(q['cache']['reranked_fp32_memory']['R@1'], 3)}")
        if cg := q.get("contrast_groups"):  # absent in documents from before it was measured
            lines.append(f"        own scene first within its contrast group ({cg['queries']} captions): first stage "
                         f"{_f(cg['first_stage'], 3)} vs reranked {_f(cg['reranked'], 3)} (chance {_f(cg['chance'], 3)})")
        lines.append("        phases: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in q["phases_s"].items()))
    return lines


def _blip(b: dict[str, Any]) -> list[str]:
    """The blip suite: per storage option bytes, cached vs re-encoding, agreement; index rates."""
    lines = [f"blip    {b['checkpoint']} on {b['device_name']} ({b['precision']}), {b['candidates']} candidates; {b['weights']}"]
    for res, r in b["reencode"].items():
        a, d = r["vision_on_pixels"], r["decode_preprocess_vision"]
        c = b.get("compute", {}).get(res)
        lines.append(f"        re-encoding the {b['candidates']} images at {res} px: vision model on pixels {_f(a['p50_ms'], 1)} ms, "
                     f"decode + preprocess + vision {_f(d['p50_ms'], 1)} ms p50 (n={a['n']}{', summed' if 'method' in d else ''})"
                     + (f"; by MACs re-encoding is {_f(c['mac_ratio'], 1)}x the cached path's work ({_f(c['vision_gmac_per_image'], 1)} GMAC vision "
                        f"per image vs {_f(c['text_side_gmac_per_candidate'], 1)} text side per candidate, "
                        f"{_f(c['of_which_cross_attention_kv_projection'], 1)} of it cross-attention K/V)" if c else ""))
    if f := b.get("fold"):
        lines += _blip_fold(f)
    for name, o in b["options"].items():
        by, sc = o["bytes_per_image"], o["scores"]
        agree = o[f"agreement_vs_{b['reference']}"]
        lines.append(f"        {name:<9} {by['cache_bytes_per_item']:>9,} B/img ({_f(by['file_bytes_per_item'], 0)} in the file, "
                     f"{_f(o['gb_per_100k_images'])} GB per 100k): cached p50 {_f(o['cached']['p50_ms'], 1)} ms (cache read "
                     f"{_f(o['cache_read']['p50_ms'], 1)}) -> {_f(o['speedup_vs_reencode_vision']['ratio'], 1)}x vs re-encoding, "
                     f"{_f(o['speedup_vs_reencode_with_decode']['ratio'], 1)}x with decode"
                     + (f", {_f(o['speedup_cpu_time']['ratio'], 1)}x by CPU time" if "speedup_cpu_time" in o else "") + "; scores "
                     f"{'identical' if sc['identical'] else 'DIFFER'} ({sc['max_abs_diff_vs_reencoded_same_storage']:.1e}); vs "
                     f"{b['reference']}: max diff {agree['max_abs_score_diff']:.2g}, tau {_f(agree['kendall_tau'])}, "
                     f"top-10 {_f(agree['top10_overlap'])}")
    for res, ix in b["index"].items():
        w, wo = ix["with_blip"], ix["without_blip"]
        lines.append(f"        index at {res} px: {_f(w['img_s'], 1)} img/s with BLIP tokens vs {_f(wo['img_s'], 1)} without "
                     f"-> {_f(ix['throughput']['ratio'])} (steady {_f(w['steady_img_s'], 1)} vs {_f(wo['steady_img_s'], 1)}; "
                     f"first stage {b['first_stage']})")
    if lz := b.get("lazy"):
        from .blip_lazy import lazy_lines

        lines += lazy_lines(lz)
    if (p := b.get("parity")) and p.get("measured"):
        lines.append(f"        parity with transformers' forward ({p['precision']}, {p['images']} images): max ITM logit diff "
                     f"{p['max_abs_diff_itm_logit']:.1e}")
    if la := b.get("load_avg"):
        lines.append(f"        load average (1/5/15 min) {la['start']} at the start, {la['end']} at the end")
    return lines


def _blip_fold(f: dict[str, Any]) -> list[str]:
    """The blip suite's folded vs standard cross-attention: time and work per candidate, break-even."""
    parts = []
    for name, p in f["paths"].items():
        parts.append(f"{name} {_f(p['cached']['p50_ms'], 0)} ms ({_f(p['ms_per_candidate'], 1)} ms and {_f(p['text_side_gmac_per_candidate'], 2)} "
                     f"GMAC per candidate, {_f(p['gmac_per_s'], 1)} GMAC/s) -> {_f(p['speedup_vs_reencode_vision']['ratio'], 1)}x vs re-encoding"
                     + (f" ({_f(p['speedup_cpu_time']['ratio'], 1)}x by CPU time)" if "speedup_cpu_time" in p else ""))
    lines = [f"        cross-attention for the {f['query_tokens']}-token query: the stage used {f['path_used']} (folds up to "
             f"{f['fold_max_tokens']} tokens; by MACs folding pays up to {f['mac_break_even_tokens']}); " + "; ".join(parts)
             + f"; standard / folded {_f(f['standard_vs_folded']['ratio'], 2)}x; scores differ by "
             f"{f['scores_max_abs_diff_between_paths']:.1e} (vision {_f(f['vision_gmac_per_image'], 1)} GMAC per image)"]
    if be := f.get("break_even"):
        pts = ", ".join(f"{r['query_tokens']}: {_f(r['standard_over_folded'], 2)}" for r in be["rows"])
        lines.append(f"        break-even sweep ({be['what']}): standard / folded time by query tokens {pts}; standard first wins at "
                     f"{be['first_tokens_where_standard_wins'] or 'none of these'} tokens")
    return lines


def profiling(doc: dict[str, Any]) -> list[str]:
    """The measured effect of the changes applied after profiling (benchmarks/README.md), each
    against the previous behaviour in the same run."""
    s, lines = doc["suites"], []
    if (rr := s.get("rerank")) and (tt := rr.get("text_trim")):
        n = tt["candidates"]
        lat = rr["latency"].get(str(n)) or next(iter(rr["latency"].values()))
        lines.append(
            f"- Query text tower on the query's {tt['check']['positions'][1]} real positions instead of all "
            f"{tt['check']['positions'][0]}: text encode {_f(tt['text_encode_full_context']['p50_ms'])} -> {_f(tt['text_encode']['p50_ms'])} ms "
            f"({_f(tt['text_gain']['ratio'])}x), whole rerank call at {n} candidates {_f(tt['rerank_full_context']['p50_ms'])} -> "
            f"{_f(tt['rerank']['p50_ms'])} ms ({_f(tt['rerank_gain']['ratio'])}x); largest difference {tt['check']['max_abs_diff_embedding']:.1e} "
            f"(embedding), {tt['check']['max_abs_diff_real_tokens']:.1e} (token features). The stage's p50 at {n} candidates is now "
            f"{_f(lat['total']['p50_ms'])} ms: text encode {_f(lat['text_encode']['p50_ms'])}, cache read {_f(lat['cache_read']['p50_ms'])}, "
            f"model {_f(lat['model']['p50_ms'])} ms.")
    if (enc := s.get("encode")) and (it := enc.get("index_threads")):
        lines.append(
            f"- Indexing on CPU with {it['workers']} decode workers on {it['threads']} torch thread(s) instead of {it['default_threads']}: "
            f"{_f(it['gain']['value'])}x pipeline throughput (median of adjacent pairs; {_f(it['all_threads_pipeline_img_s'], 1)} -> "
            f"{_f(it['pipeline_img_s'], 1)} img/s), ratio to the bare forward {_f(it['all_threads_ratio'])} -> {_f(enc['ratio_median'])}.")
    if se := s.get("search"):
        for r in se["results"]:
            if b := r.get("before_flush"):
                lines.append(
                    f"- Milvus Lite, {r['vectors']:,} vectors: raw search p50 {_f(b['raw_search_unflushed']['p50_ms'])} ms on rows as upserted "
                    f"(what an index run left before) vs {_f(b['raw_search_flushed']['p50_ms'])} ms right after `MilvusStore.flush` "
                    f"({b['flush_s']} s, now the end of every index run){_later(b)}; n={b['raw_search_unflushed']['n']} each.")
            for limit, lat in r["latency"].items():
                if r["index_type"] == "AUTOINDEX" and "has_collection_rpc" in lat:
                    lines.append(
                        f"- Search overhead, {r['vectors']:,} vectors, limit {limit}: store {lat['store_vs_raw']['overhead_pct']:+.1f}%, "
                        f"pipeline {lat['pipeline_vs_raw']['overhead_pct']:+.1f}% over raw ({_f(lat['raw_client']['p50_ms'])} ms p50), with no "
                        f"has_collection round trip per query (one costs {_f(lat['has_collection_rpc']['p50_ms'])} ms p50; the store made one "
                        f"and the pipeline two per query before).")
        if cv := se.get("cli_via_server"):
            lines += ["- " + line.strip() for line in _cli_via_server(cv)]
    return lines


def _cli_via_server(cv: dict[str, Any]) -> list[str]:
    g = cv["demo_grouping"]
    return [
        f"search  `mmr search --json` in a new process, demo collection: through a running `mmr serve` "
        f"{_f(cv['via_server_s']['p50_ms'] / 1000)} s p50 vs {_f(cv['loads_model_s']['p50_ms'] / 1000)} s loading the model "
        f"(`mmr --version` {_f(cv['mmr_version_s']['p50_ms'] / 1000)} s; n={cv['via_server_s']['n']}, load average {cv['load_avg_1m']:.1f})",
        *(f"        `mmr {name} --json` the same way: {_f(o['via_server_s']['p50_ms'] / 1000)} s p50 through the server vs "
          f"{_f(o['loads_model_s']['p50_ms'] / 1000)} s loading the models" for name, o in cv.get("others", {}).items()),
        f"        demo collection (8 images, no video), 100 candidates: first stage p50 {_f(g['now']['p50_ms'])} ms vs "
        f"{_f(g['before_grouped']['p50_ms'])} ms grouped by video as before ({_f(g['now_vs_before']['ratio'])}x)",
    ]


def _later(b: dict[str, Any]) -> str:
    """Probes taken while the flushed segments' index was being built, if the run has them."""
    later = b.get("raw_search_after_flush") or []
    return "".join(f", {p['after_s']:g} s later {_f(p['p50_ms'])} ms" for p in later)


def human(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = [f"mmr bench {'(quick) ' if doc['quick'] else ''}on {m['device']}{' ' + m['gpu'] if m.get('gpu') else ''}, "
           f"{m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, commit {m['commit']}"]
    out += figures(doc)
    out.append("targets (DESIGN.md section 4):")
    for t in doc["targets"]:
        out.append(f"  [{t['status']}] {t['what']} {t['target']}: {t['measured']}")
    return "\n".join(out)


def markdown(doc: dict[str, Any]) -> str:
    """``benchmarks/RESULTS.md``: machine, targets table, the figures, where the raw JSON is."""
    m = doc["machine"]
    lines = [
        "# Benchmark results",
        "",
        "Generated by `mmr bench` (`--from` merges runs; each suite's own run is listed below). Every number",
        "was measured, each figure side by side with what it is compared against in the same run.",
        "Regenerate: see `benchmarks/README.md`. Raw documents: `benchmarks/results/`.",
        "",
        "| | |", "|---|---|",
        f"| date (UTC) | {m['date']} |",
        f"| machine | {m['nproc']} CPUs, {m['cpu']}; load average at start {m.get('load_avg_1m_at_start', '?')} (shared) |",
        f"| device | {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ' (no GPU lent to this run)'} |",
        f"| software | torch {m['torch']} ({m['torch_threads']} threads), open_clip {m['open_clip']}, transformers {m['transformers']}, "
        f"pymilvus {m['pymilvus']}, milvus-lite {m['milvus_lite']}, Python {m['python']} |",
        f"| commit | {m['commit']} |",
        f"| mode | {'quick (structure only, sizes too small to mean anything)' if doc['quick'] else 'full'}; suites: {', '.join(doc['suites'])}; {doc['seconds']:.0f} s |",
    ]
    for name, run in (doc.get("runs") or {}).items():
        lines.append(f"| suite {name} | run {run['date']}, commit {run['commit']}, load average at start "
                     f"{run.get('load_avg_1m_at_start', '?')}, {run['device']}{', quick' if run.get('quick') else ''} |")
    lines += [
        "",
        "## DESIGN.md section 4 targets",
        "",
        "| target | status | measured |",
        "|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(f"| {t['what']}: {t['target']} | **{t['status']}** | {t['measured']} |")
    lines += ["", "## Figures", "", "```"] + figures(doc) + ["```", ""]
    prof = profiling(doc)
    if prof:
        lines += ["## Changes applied after profiling: measured in this run", "",
                  "What was changed and why is in `benchmarks/README.md`; each figure here compares the new behaviour with the "
                  "previous one in the same run.", ""]
        lines += prof + [""]
    return "\n".join(lines)
