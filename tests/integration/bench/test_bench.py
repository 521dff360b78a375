"""`mmr bench --quick`: every suite runs and prints a well-formed JSON document.

These check structure, not speed: quick sizes are far too small for the numbers to mean anything,
so the only numeric assertions are "finite" and, for times and rates, "positive".
"""

import json
import math

import pytest

from mm_retrieval.cli import main
from tests.helpers import numbers

pytestmark = pytest.mark.slow  # each suite runs `mmr bench --quick`

TARGET_STATUSES = {"met", "not met", "not measurable here", "not run"}


def bench(tmp_path, capsys, *args):
    """``mmr bench --quick --json`` in this process (the suites share the imported libraries, which
    would cost more than the suites themselves in a subprocess each)."""
    rc = main(["bench", "--quick", "--device", "cpu", "--json", "--workdir", str(tmp_path / "work"), *args])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return json.loads(out.out), out.err


def check_common(doc, suite):
    assert doc["quick"] is True
    assert set(doc["suites"]) == {suite}
    m = doc["machine"]
    assert m["nproc"] >= 1 and m["cpu"] and m["torch"] and m["device"] == "cpu"
    from mm_retrieval.bench.targets import judge

    assert len(doc["targets"]) == len(judge({}, m))  # every target has its row, "not run" ones too
    for t in doc["targets"]:
        assert set(t) == {"what", "target", "status", "measured"} and t["status"] in TARGET_STATUSES
    for where, x in numbers(doc):
        assert math.isfinite(x), where


def positive_times(node):
    """Every latency / rate field is > 0."""
    for where, x in numbers(node):
        leaf = where.rsplit(".", 1)[-1]
        if leaf.endswith(("_ms", "_img_s", "_per_s")) and leaf != "other_p50_ms":
            assert x > 0, where


def test_bench_encode_quick(tmp_path, capsys):
    doc, stderr = bench(tmp_path, capsys, "--suite", "encode", "--markdown", str(tmp_path / "RESULTS.md"),
                        "--out", str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text()) == doc
    check_common(doc, "encode")
    enc = doc["suites"]["encode"]
    t = enc["throughput"]
    assert t["value"] > 0 and t["against_value"] > 0 and t["ratio"] > 0 and t["against"]
    assert enc["images"] > 0 and all(r["indexed"] == enc["images"] for r in enc["runs"])
    assert {r["token_cache"] for r in enc["runs"]} == {True, False}
    positive_times(enc)
    assert enc["first_batch"]["in_process_first_s"] > 0 and all(r["first_batch_s"] > 0 for r in enc["runs"])
    assert enc["small_run"]["indexed"] == enc["small_run"]["images"] > 0 and enc["small_run"]["seconds"] > 0
    assert enc["fastest"]["pipeline_img_s"] > 0 and "default_is_fastest" in enc["fastest"]
    assert "vs bare forward" in stderr  # the summary names what each figure is measured against
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| indexing throughput" in md and doc["machine"]["cpu"] in md
    targets = {t["what"]: t for t in doc["targets"]}
    assert targets["held-out compositional: reranked R@1 - first-stage R@1"]["status"] == "not run"

    # a saved document is reported again (and merged with others) without running anything
    assert main(["bench", "--from", str(tmp_path / "out.json"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["suites"] == doc["suites"] and again["targets"] == doc["targets"]
    assert again["runs"]["encode"]["date"] == doc["machine"]["date"]


def test_bench_search_quick(tmp_path, capsys):
    doc, _ = bench(tmp_path, capsys, "--suite", "search")
    check_common(doc, "search")
    results = doc["suites"]["search"]["results"]
    assert {r["index_type"] for r in results} == {"AUTOINDEX", "HNSW"}
    for r in results:
        assert 0.0 <= r["recall@10"] <= 1.0
        for lat in r["latency"].values():
            assert set(lat) >= {"raw_client", "store", "pipeline", "store_vs_raw", "pipeline_vs_raw", "store_grouped_before"}
            assert lat["store_vs_raw"]["against"].startswith("raw MilvusClient.search")
            assert lat["store_now_vs_grouped_before"]["ratio"] > 0
        positive_times(r["latency"])
    assert "recall@10_with_small_ef" in next(r for r in results if r["index_type"] == "HNSW")
    cv = doc["suites"]["search"]["cli_via_server"]  # `mmr search` through a running server vs loading the model
    assert cv["via_server_s"]["n"] == 3 and cv["loads_model_s"]["n"] >= 1 and cv["demo_grouping"]["now_vs_before"]["ratio"] > 0
    assert {name: o["via_server_s"]["n"] for name, o in cv["others"].items()} == {"eval": 3, "explain": 3}  # `mmr eval`, `mmr explain` too
    positive_times(cv)
    targets = {t["what"]: t for t in doc["targets"]}
    assert next(t for w, t in targets.items() if w.startswith("`mmr search` (a new process)"))["status"] in {"met", "not met"}


def test_bench_rerank_quick(tmp_path, capsys):
    doc, _ = bench(tmp_path, capsys, "--suite", "rerank")
    check_common(doc, "rerank")
    rr = doc["suites"]["rerank"]
    for lat in rr["latency"].values():
        assert set(lat) >= {"total", "text_encode", "cache_read", "model", "pairs_per_s"}
    positive_times(rr["latency"])
    once = rr["encode_once"]  # the query encoded once vs twice (issue 13), measured side by side
    assert once["gain"]["against"].startswith("query encoded once") and once["gain"]["ratio"] > 0
    assert once["encoded_once"]["n"] == once["encoded_twice"]["n"] > 0
    positive_times(once)
    peer = next(iter(rr["peer"]["results"].values()))
    assert peer["speedup_vs_blip_itm"]["value"] > 0 and peer["speedup_vs_blip_precomputed"]["value"] > 0
    reads = rr["token_read"]["slots"]  # issue 24: memory-mapped slots vs SQLite blobs vs a plain copy, per slot size
    assert {d["slot_bytes"] for d in reads.values()} == {49 * 128 * 2, 577 * 768 * 2}
    for d in reads.values():
        assert d["memmap_vs_sqlite"]["ratio"] > 0 and d["memmap_vs_copy_limit"]["ratio"] > 0
        positive_times(d)
    own = rr["own_rerank_store"]
    assert own["rerank_gain"]["ratio"] > 0 and own["read_before"]["n"] == own["read_now"]["n"] > 0
    layouts = rr["cache_layouts"]["layouts"]
    assert [layouts[k]["kv_heads"] for k in ("multi_head", "grouped", "multi_query")] == [4, 2, 1]
    for lay in layouts.values():
        mem, kv = lay["memory_bytes_per_image"], lay["per_layer_kv_bytes_per_image"]
        assert mem["config"] == mem["tensor"] > 0 and mem["on_disk"] >= mem["tensor"]
        assert kv["formula"] == kv["tensor"] > 0
    # the cached memory does not depend on kv_heads; per-layer K/V would, proportionally
    assert len({lay["memory_bytes_per_image"]["tensor"] for lay in layouts.values()}) == 1
    assert layouts["multi_head"]["per_layer_kv_bytes_per_image"]["tensor"] == 4 * layouts["multi_query"]["per_layer_kv_bytes_per_image"]["tensor"]


def test_bench_video_quick(tmp_path, capsys):
    doc, _ = bench(tmp_path, capsys, "--suite", "video")
    check_common(doc, "video")
    v = doc["suites"]["video"]
    d = v["decode"]
    assert d["frames_decoded"] >= d["frames_sampled"] > 0 and d["decoded_frames_per_s"]["against"].startswith("bare PyAV decode")
    assert d["decoded_frames_per_s"]["value"] > 0 and d["decoded_frames_per_s"]["against_value"] > 0
    demo = v["models"]["demo"]
    assert demo["failed"] == [] and demo["segments"] >= 1 and demo["indexed"] == demo["segments"]
    assert demo["index_s_per_video_hour"]["value"] > demo["index_s_per_video_hour"]["against_value"] > 0  # indexing includes decoding
    assert demo["segments_per_minute"]["value"] > 0 and demo["segments_per_minute"]["against_value"] > 0
    assert 0 <= demo["scene_changes_found"]["found"] <= demo["scene_changes_found"]["of"]
    g = v["grouping"]
    assert g["rows"] == g["videos"] * g["segments_per_video"] > 0
    assert g["milvus_vs_python"]["ratio"] > 0 and g["milvus_vs_python"]["median_of_round_ratios"] > 0
    assert all(0 <= g[key] <= 1 for key in ("python_found_k_videos", "milvus_found_k_videos", "python_agrees_with_milvus"))
    positive_times(v)


@pytest.mark.bench  # trains an encoder (open_clip_train in a subprocess) and a reranker: minutes
def test_bench_quality_quick(tmp_path, capsys):
    doc, _ = bench(tmp_path, capsys, "--suite", "quality")
    check_common(doc, "quality")
    q = doc["suites"]["quality"]
    for name in ("first_stage", "reranked"):
        assert set(q["eval"][name]) == {"R@1", "R@5", "R@10"}
        assert all(0.0 <= v <= 1.0 for v in q["eval"][name].values())
    assert q["cache"]["bytes_per_image"] > 0
    cg = q["contrast_groups"]  # every held-out caption judged within its own contrast group
    assert cg["queries"] == q["data"]["test_images"]
    assert 0.0 < cg["chance"] <= 0.5 and all(0.0 <= cg[k] <= 1.0 for k in ("first_stage", "reranked"))
    assert all(v >= 0 for v in q["phases_s"].values())


def test_bench_cli_quick(tmp_path, capsys):
    doc, stderr = bench(tmp_path, capsys, "--suite", "cli")
    check_common(doc, "cli")
    c = doc["suites"]["cli"]
    errors = {k: v for k, v in c["cases"].items() if not k.startswith("baseline")}
    assert {"filter_unknown_field", "table_without_path_column", "other_model_than_collection", "missing_collection"} <= set(errors)
    assert c["all_exit_2"] and c["all_one_line"], c["cases"]  # each refused with one line (not timed here)
    assert c["cases"]["baseline_search_loads_model"]["exit_code"] == 0
    assert c["slowest_error_s"] == max(v["median_s"] for v in errors.values()) > 0
    assert "errors found without the model" in stderr
    # the default model's weights, not cached, HF_HUB_OFFLINE=1: refused at once in one line saying what to do
    # (test_first_hour.py checks the same with a hub that can't be reached)
    offline = c["uncached_weights_offline"]
    assert offline["exit_code"] == 2 and offline["stderr_lines"] == 1, offline
    assert offline["error"].startswith("error: could not fetch the weights for ViT-B-32") and offline["median_s"] > 0
    assert "HF_HUB_OFFLINE is set" in offline["error"] and "--pretrained PATH" in offline["error"]
    assert "uncached weights, offline: refused in" in stderr
    targets = {t["what"].split(" (")[0]: t for t in doc["targets"]}
    assert targets["CLI errors checkable without the model"]["status"] in ("met", "not met")


def test_bench_photos_quick(tmp_path, capsys):
    doc, stderr = bench(tmp_path, capsys, "--suite", "photos")
    check_common(doc, "photos")
    p = doc["suites"]["photos"]
    positive_times(p)
    r = p["decode_metadata_on_vs_off"]
    assert r["value"] > 0 and r["against_value"] > 0 and r["unit"] == "images/s"
    assert p["extraction_per_image"]["n"] > 0 and p["extraction_per_video"]["n"] > 0
    assert p["watch"]["repeats"] == len(p["watch"]["latency_s"]) and p["watch"]["median_s"] >= p["watch"]["debounce_s"]
    assert "decode with file metadata" in stderr
    targets = {t["what"].split(" (")[0]: t for t in doc["targets"]}
    assert targets["decode throughput with file metadata"]["status"] in ("met", "not met")


def test_bench_dupes_quick(tmp_path, capsys):
    doc, stderr = bench(tmp_path, capsys, "--suite", "dupes")
    check_common(doc, "dupes")
    d = doc["suites"]["dupes"]
    positive_times(d)
    g = d["groups"]
    assert g["indexed"] == g["images"] > 0 and g["candidate_pairs"] > 0
    for r in (g["default"], g["best"], *g["sweep"]):
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert g["default"]["recall"] > 0.5  # copies are found at all
    assert d["time"]["items"] == 1000 and d["time"]["groups"] > 0
    assert d["hash_cost"]["phash"]["n"] > 0 and "dupes groups: precision" in stderr


def test_bench_ocr_quick(tmp_path, capsys):
    pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra")
    doc, stderr = bench(tmp_path, capsys, "--suite", "ocr")
    check_common(doc, "ocr")
    p = doc["suites"]["ocr"]
    positive_times(p)
    assert p["images"] == p["signs"] + p["screenshots"] == p["recall"]["all"]["n"]
    for block in p["recall"].values():
        assert all(v is None or 0 <= v <= 1 for k, v in block.items() if k != "n")
    assert p["recall"]["all"]["phrase_recall"] > 0  # the words are found at all
    r = p["index_ocr_on_vs_off"]
    assert r["value"] > 0 and r["against_value"] > 0 and r["unit"] == "images/s"
    assert p["ocr_per_image"]["n"] > 0 and "exact word recall" in stderr


def test_bench_probe_quick(tmp_path, capsys):
    doc, stderr = bench(tmp_path, capsys, "--suite", "probe")
    check_common(doc, "probe")
    p = doc["suites"]["probe"]
    assert p["encoder"] == "demo (shipped)" and p["pool_type"] == "tok" and p["seeds"] == [0, 1]
    assert list(p["layers"]) == ["pixels", "patch_embed", "block_0", "block_1", "final"]
    for lay in p["layers"].values():
        for t in ("colour", "shape"):
            assert 0 <= lay[t]["test"]["mean"] <= 1 and len(lay[t]["test"]["per_seed"]) == 2
    assert p["patches"]["test"] > 0 and "linear probe per patch" in stderr


def test_bench_unknown_suite_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
