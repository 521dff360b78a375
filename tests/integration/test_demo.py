"""The README's main job, `mmr demo`, end to end at its --quick size."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the whole demo in a subprocess: minutes


def test_quick_demo_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mm_retrieval", "demo", "--quick", "--dir", str(tmp_path / "demo"), "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["n_queries"] > 0 and doc["gallery"] >= 240
    assert set(doc["first_stage"]) == set(doc["reranked"]) == {"R@1", "R@5", "R@10"}
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out.stderr
    assert (tmp_path / "demo" / "encoder" / "open_clip_config.json").exists()
    assert (tmp_path / "demo" / "reranker" / "reranker.json").exists()
    assert json.loads((tmp_path / "demo" / "eval.json").read_text()) == doc
