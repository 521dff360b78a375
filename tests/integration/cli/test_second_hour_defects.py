"""Issue 29 item 7: the small defects a new user met in the second hour, each as the user saw it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mm_retrieval.cli import main
from mm_retrieval.types import Hit, moment_text

TINY_ARGS = ["--model", "mmr-tiny", "--pretrained", "none"]
APP_JS = Path(__file__).resolve().parents[3] / "mm_retrieval" / "server" / "static" / "app.js"


def run_js(functions: list[str], expression: str) -> object:
    """``expression`` (JSON-printed) evaluated by node after the page's own top-level
    ``functions``, taken from app.js as written."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's functions can't be run outside a browser")
    source = APP_JS.read_text()
    parts = []
    for name in functions:
        found = re.search(rf"^function {name}\(.*?^}}$", source, re.DOTALL | re.MULTILINE) or re.search(rf"^function {name}\(.*?}}$", source, re.MULTILINE)
        assert found, f"app.js has no top-level function {name}"
        parts.append(found.group(0))
    run = subprocess.run([node, "-e", "\n".join(parts) + f"\nconsole.log(JSON.stringify({expression}));"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# ---- an empty folder: one honest message ------------------------------------------------------
def test_an_empty_folder_names_no_collection(tmp_path, capsys):
    (tmp_path / "emp").mkdir()
    code = main(["index", str(tmp_path / "emp"), "--db", str(tmp_path / "mmr.db"), "--collection", "emp", *TINY_ARGS,
                 "--workers", "0", "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0
    assert "indexed 0" in cap.out and "collection" not in cap.out  # no "-> collection 'emp' (0 items)"
    assert "no collection was created" in cap.err


# ---- a moment: one rounding rule, the CLI's and the page's ------------------------------------
def test_a_moment_is_written_by_one_rule():
    assert moment_text(13.4, 20.2) == "0:13–0:21"  # the span shown covers the whole moment
    assert moment_text(0.0, 6.0) == "0:00–0:06" and moment_text(3599.5, 3600.2) == "59:59–1:00:01"
    hit = Hit(id="s", path="/v.mp4", score=1.0, retrieval_score=1.0, video_id="v", start=13.4, end=20.2, frame=15.0)
    assert hit.to_dict()["moment"] == "0:13–0:21" and Hit(id="i", path="/a.png", score=1.0, retrieval_score=1.0).moment is None
    shown = run_js(["momentText"], f"momentText({json.dumps(hit.to_dict())})")
    assert shown == "0:13–0:21"  # the page shows the server's text: it has no rounding of its own


@pytest.fixture
def video_db(tmp_path):
    from mm_retrieval import Pipeline
    from mm_retrieval.testing.videos import make_video

    make_video(tmp_path / "clips" / "clip.webm", [("red", 3.4), ("blue", 2.7), ("green", 3.3)], fps=5, size=32)
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0, "batch_size": 4}) as pipe:
        pipe.index(tmp_path / "clips", progress=False)
    return db


def test_the_cli_prints_each_moment_as_the_page_shows_it(video_db, capsys):
    args = ["search", "a red picture", "--db", video_db, "--no-group-by-video", "--k", "10"]
    assert main([*args, "--json"]) == 0
    hits = [h for h in json.loads(capsys.readouterr().out)["hits"] if h.get("video")]
    assert hits
    assert main(args) == 0
    printed = re.findall(r"\[([^\]]+)\]", capsys.readouterr().out)
    on_page = run_js(["momentText"], f"{json.dumps(hits)}.map(momentText)")
    assert printed == on_page == [moment_text(h["start"], h["end"]) for h in hits]


# ---- the page's status line says each thing once ----------------------------------------------
def test_the_status_line_names_the_reranker_score_once():
    source = APP_JS.read_text()
    assert "ordered by the ${order.name} (${order.meaning})" in source  # render()'s status line
    doc = {"mode": "image", "reranked": True, "hits": []}
    order = run_js(["scoreColumns"], f"scoreColumns({json.dumps(doc)}, false).map(c => [c.name, c.meaning])")[0]
    status = f"ordered by the {order[0]} ({order[1]})"
    assert status == "ordered by the reranker score (a logit, higher is better)"


# ---- mmr explain: the PNG's words keep their spaces -------------------------------------------
def _gaps(ink: np.ndarray) -> list[int]:
    """Widths of the blank column runs between the first and the last inked column."""
    cols = ink.any(axis=0)
    idx = np.flatnonzero(cols)
    runs, run = [], 0
    for c in cols[idx[0]: idx[-1] + 1]:
        if c:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    return runs


def test_the_explain_png_title_keeps_its_spaces(tmp_path):
    from PIL import Image

    from mm_retrieval.explain import Explanation, render_grid
    from mm_retrieval.types import AttentionMaps

    words = ["a", "rocket", "on", "the", "moon"]
    maps = np.random.default_rng(0).random((1, 2, len(words), 7, 7))
    ex = Explanation("a rocket on the moon", AttentionMaps(1.5, 0.25, words, maps), Image.new("RGB", (64, 64), "gray"))
    png = render_grid(ex, tmp_path / "explain.png")
    title = np.asarray(Image.open(png).convert("L"))[:24] < 128  # the title band, above the panels
    # "'a rocket on the moon'  reranker 1.500  first stage 0.250  (mean over heads, mean over layers)": 14 spaces
    # between words; letters within a word sit at most 2 px apart, so a space must be wider to read as one
    # (Pillow's default font at this size draws it 2 px wide: "firststage", 9 such gaps here)
    assert sum(g >= 4 for g in _gaps(title)) >= 14, _gaps(title)


# ---- the README's and docs/reranking.md's quality figures: what the demo prints ---------------------------------------
def test_the_readme_quality_table_agrees_with_the_demo_it_describes():
    """The quick start quotes what `mmr demo` prints (first stage, then reranked R@1 / R@5 / R@10);
    the reranker's quality table has the same shipped-model figures, and every gain or loss the
    prose states is the difference of a pair of its rows."""
    root = APP_JS.parents[3]  # the quote is in the README, the table on the reranking page
    readme = " ".join(" ".join((root / page).read_text() for page in ("README.md", "docs/reranking.md")).split())
    quoted = re.search(r"With the shipped weights it prints R@1 / R@5 / R@10 of ([\d.]+) / ([\d.]+) / ([\d.]+) for the "
                       r"first stage and ([\d.]+) / ([\d.]+) / ([\d.]+) reranked", readme)
    assert quoted, "the quick start no longer quotes the demo's numbers"
    demo = [float(x) for x in quoted.groups()]
    section = readme.split(" ## The reranker ", 1)[1].split(" ## ", 1)[0]
    rows = [[float(x) for x in row] for row in re.findall(r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", section)]
    shipped = re.search(r"\| shipped \(`mmr demo`\) \| first stage \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| \| \| reranked \| "
                        r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", section)
    assert shipped, "the quality table has no row for the shipped models that `mmr demo` uses"
    assert [float(x) for x in shipped.groups()] == demo
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
    for verb, points, metric in re.findall(r"(gains?|gained|loses|lost) ([\d.]+) points? of (R@\d+)", section):
        k = {"R@1": 0, "R@5": 1, "R@10": 2}[metric]
        sign = 1 if verb.startswith("gain") else -1
        assert any(abs((after[k] - before[k]) * 100 - sign * float(points)) < 0.05 for before, after in pairs), (verb, points, metric)
