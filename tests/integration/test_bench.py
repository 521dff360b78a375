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
    assert len(doc["targets"]) == 9
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
            assert set(lat) >= {"raw_client", "store", "pipeline", "store_vs_raw", "pipeline_vs_raw"}
            assert lat["store_vs_raw"]["against"].startswith("raw MilvusClient.search")
        positive_times(r["latency"])
    assert "recall@10_with_small_ef" in next(r for r in results if r["index_type"] == "HNSW")


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


def test_bench_unknown_suite_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
