"""`mmr bench --suite blip --quick`: the BLIP reranker from cached tokens vs re-encoding, per
storage option, and the GPU script's path on a machine without Milvus or open_clip.

Quick sizes (tiny random BLIP, 8 candidates) make the timings meaningless; what is checked is that
every figure is there and the measured relations that do not depend on speed hold: cached scores
equal the re-encoded ones, int8 and the lower resolution take fewer bytes, parity with transformers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_retrieval.cli import main
from tests.helpers import numbers

pytestmark = pytest.mark.slow  # BLIP and CLIP forwards, a cache per storage option; ~15 s each

ROOT = Path(__file__).resolve().parents[3]
OPTIONS = {"fp16@32", "int8@32", "fp16@16", "int8@16"}  # the tiny checkpoint: 32 px, patch 8; half is 16 px


def check_blip_section(b):
    assert set(b["options"]) == OPTIONS and b["reference"] == "fp16@32"
    assert b["meaningful_agreement"] is False and "random weights" in b["weights"] and "not meaningful" in b["weights"]
    assert b["candidates"] == 8 and b["device"] == "cpu" and b["precision"] == "fp32"
    for where, x in numbers(b):
        assert math.isfinite(x), where
    for name, o in b["options"].items():
        by = o["bytes_per_image"]
        assert by["stage_info"] == by["cache_bytes_per_item"] > 0, name  # the stage's claim is the cache's
        assert by["file_bytes_per_item"] >= by["cache_bytes_per_item"], name  # SQLite's overhead on top
        s = o["scores"]
        assert s["identical"] and s["max_abs_diff_vs_reencoded_same_storage"] <= s["tolerance"] <= 1e-3 * max(1, *map(abs, s["score_range"])), name
        assert s["cached_tokens_bit_identical_to_reencoded"] and s["scores_compared"] == 8, name
        assert s["score_range"][0] < s["score_range"][1], name  # the tiny model tells candidates apart
        for key in ("speedup_vs_reencode_vision", "speedup_vs_reencode_with_decode"):
            f = o[key]
            assert f["value"] > 0 and f["against_value"] == o["cached"]["p50_ms"] and f["ratio"] > 0, (name, key)
        assert o["cached"]["n"] == 3 and o["cache_read"]["p50_ms"] > 0
        assert o["speedup_cpu_time"]["value"] > 0 and o["speedup_cpu_time"]["against_value"] > 0  # CPU only: this process's CPU seconds
        a = o["agreement_vs_fp16@32"]
        assert -1 <= a["kendall_tau"] <= 1 and 0 <= a["top10_overlap"] <= 1 and a["k"] == 8
    opt = b["options"]
    assert opt["fp16@32"]["tokens"] == 17 and opt["fp16@16"]["tokens"] == 5  # 4x4 (2x2) patches + CLS
    size = {n: o["bytes_per_image"]["cache_bytes_per_item"] for n, o in opt.items()}
    assert size["int8@32"] < size["fp16@32"] and size["int8@16"] < size["fp16@16"] < size["fp16@32"]
    assert size["fp16@32"] == 17 * 48 * 2 and size["int8@32"] == 17 * 50  # 48 int8 values + a 2-byte scale per token
    ref = opt["fp16@32"]["agreement_vs_fp16@32"]
    assert ref["max_abs_score_diff"] == 0 and ref["kendall_tau"] == 1 and ref["top10_overlap"] == 1
    # int8 loses more than fp16 against unstored (float32) tokens, and is not lossless
    loss = {n: opt[n]["scores"]["max_abs_diff_vs_reencoded_unstored"] for n in ("fp16@32", "int8@32")}
    assert 0 < loss["int8@32"] and loss["fp16@32"] < loss["int8@32"]
    assert opt["int8@32"]["agreement_vs_fp16@32"]["max_abs_score_diff"] > 0
    for res, r in b["reencode"].items():
        assert r["vision_on_pixels"]["n"] == 2 and r["decode_preprocess_vision"]["p50_ms"] > 0, res
    for res, ix in b["index"].items():
        assert ix["without_blip"]["images"] == ix["with_blip"]["images"] == 12, res
        assert ix["with_blip"]["img_s"] > 0 and ix["without_blip"]["img_s"] > 0 and ix["throughput"]["ratio"] > 0
        assert ix["with_blip"]["token_write_ms_per_image"] > 0
    p = b["parity"]
    assert p["measured"] and p["precision"] == "fp32" and p["max_abs_diff_itm_logit"] <= 1e-4
    f = b["fold"]  # both cross-attention paths on the same cache: which one the stage used, time and MACs each
    assert set(f["paths"]) == {"folded", "standard"} and f["path_used"] == b["compute"]["32"]["cross_attention_path"]
    assert (f["path_used"] == "folded") == (f["query_tokens"] <= f["fold_max_tokens"])
    assert f["scores_max_abs_diff_between_paths"] <= 1e-4  # same scores either way
    for name, x in f["paths"].items():
        assert x["cached"]["n"] == 3 and x["ms_per_candidate"] > 0 and x["text_side_gmac_per_candidate"] > 0, name
        assert x["speedup_vs_reencode_vision"]["ratio"] > 0 and x["speedup_cpu_time"]["ratio"] > 0, name
    be = f["break_even"]
    assert [r["query_tokens"] for r in be["rows"]] == [4, 8, 16] and be["candidates"] == 8
    assert all(r["folded_ms_per_pair"] > 0 and r["standard_ms_per_pair"] > 0 for r in be["rows"])
    assert len(b["load_avg"]["start"]) == len(b["load_avg"]["end"]) == 3


def test_bench_blip_quick(tmp_path, capsys):
    rc = main(["bench", "--suite", "blip", "--quick", "--device", "cpu", "--json", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    doc = json.loads(out.out)
    assert set(doc["suites"]) == {"blip"} and doc["quick"] is True
    b = doc["suites"]["blip"]
    check_blip_section(b)
    assert b["first_stage"].startswith("open_clip mmr-tiny")  # open_clip is installed here: the product's encoder
    targets = {t["what"].split(":")[0]: t for t in doc["targets"]}
    assert {"BLIP ITM", "BLIP ITM cached tokens"} <= set(targets)  # (other suites' rows come and go)
    assert targets["BLIP ITM"]["status"] == "not run" and "quick" in targets["BLIP ITM"]["measured"]
    storage = targets["BLIP ITM cached tokens"]
    assert storage["status"] == "not measurable here" and "random weights" in storage["measured"]
    assert "blip    random BLIP-tiny" in out.err and "x vs re-encoding" in out.err  # the human summary
    assert "cross-attention for the" in out.err and "break-even sweep" in out.err and "load average" in out.err


def test_gpu_script_runs_without_milvus_or_open_clip(tmp_path):
    """benchmarks/gpu_blip.sh as the lead runs it on the GPU machine (a plain copy of the tree,
    python3 without pymilvus, milvus-lite or open_clip), here on the CPU in quick mode."""
    block = tmp_path / "absent"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "ABSENT = {'pymilvus', 'milvus_lite', 'open_clip', 'open_clip_train', 'fastapi', 'fastapi_offline', 'uvicorn', 'starlette'}\n"
        "class _Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ABSENT:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (absent on the GPU machine)', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "MMR_BENCH_DEVICE": "cpu", "MMR_BENCH_QUICK": "1", "PYTHON": sys.executable,
           "PYTHONPATH": str(block)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_blip.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    doc = json.loads((out / "blip-cpu.json").read_text())
    b = doc["suites"]["blip"]
    check_blip_section(b)
    assert "stand-in for open_clip" in b["first_stage"]  # the blocker worked: the path the GPU machine takes
    assert (out / "blip-cpu.md").read_text().startswith("# Benchmark results")
    assert "blip    random BLIP-tiny" in (out / "blip-cpu.log").read_text()
