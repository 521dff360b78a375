"""Ctrl-C during `mmr index` / `mmr sync`: the run says how many items landed and that running
it again resumes; running it again does."""

import os
import subprocess
import sys

from tests.helpers import TINY, make_image


def mmr(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mm_retrieval", *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **(env or {})})


def test_ctrl_c_says_what_landed_and_running_again_resumes(tmp_path):
    folder = tmp_path / "photos"
    for i in range(12):
        make_image(folder / f"p{i:02d}.png", (20 * i, 255 - 20 * i, (90 * i) % 256), seed=i)
    db = str(tmp_path / "mmr.db")
    # a real SIGINT, sent by the run to itself right after its second batch landed (as a Ctrl-C would)
    out = mmr("index", str(folder), "--db", db, "--model", "mmr-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "3",
              env={"MMR_FAILPOINTS": "after_upsert=2:INT"})
    assert out.returncode == 130, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted after") and "6 new items landed in collection 'images'" in last, out.stderr
    assert "what landed is kept. Run the same command again to resume" in last and "Traceback" not in out.stderr

    from mm_retrieval import Pipeline  # (sync and index share the run, and its Ctrl-C)

    report = Pipeline(db=db, encoder={**TINY, "workers": 0}).sync(folder, progress=False)
    assert (report.indexed, report.unchanged, report.skipped) == (6, 6, 0)
