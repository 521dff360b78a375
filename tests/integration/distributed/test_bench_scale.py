"""`mmr bench --suite scale --quick`: the suite runs single-process and real `--ray` index runs
(a local Ray instance, 1 and 2 encoder actors), Ray's pass-through pipeline and the driver-write
measurements, and reports a well-formed section. Structure only: quick sizes mean nothing.

Marked ``bench``: on a 2-core machine each Ray run starts its actors (a fresh process importing
torch and loading the model) in 15-30 s, so the quick suite takes 1-1.5 minutes.
"""

import json
import math

import pytest

from mm_retrieval.cli import main
from tests.helpers import numbers

pytestmark = pytest.mark.bench


def test_bench_scale_quick(tmp_path, capsys):
    rc = main(["bench", "--suite", "scale", "--quick", "--device", "cpu", "--json", "--workdir", str(tmp_path / "work"),
               "--markdown", str(tmp_path / "RESULTS.md")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    doc = json.loads(out.out)
    sc = doc["suites"]["scale"]
    assert set(sc["throughput"]) == {"single", "ray_1", "ray_2"}
    assert all(r["indexed"] == sc["images"] for r in sc["runs"])  # every mode indexed every image
    assert {r["actors"] for r in sc["runs"]} == {None, 1, 2}
    for where, x in numbers(sc):
        assert math.isfinite(x), where
    for m in sc["throughput"].values():
        assert m["steady_img_s"] > 0 and m["wall_img_s"] > 0
    o = sc["overhead_per_batch"]
    assert o["pass_through_via_ray_ms"] > 0 and o["pass_through_direct_ms"] > 0 and o["batches"] > 1
    w = sc["driver_writes"]["lite"]
    assert w["vectors_rows_s"] > 0 and w["token_rows_s"] > 0 and w["both_rows_s"] > 0
    assert "ray_1" in out.err and "driver writes" in out.err  # the summary
    assert "scale   mmr-tiny" in (tmp_path / "RESULTS.md").read_text()
