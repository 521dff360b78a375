"""Issue 29 items 1 and 2: what `mmr` can check without a model it checks first, and says in one line.

A bad filter, a table without a 'path' column, a model other than the collection's and a
collection that isn't there are refused before torch or open_clip is even imported (so within a
second or two: `mmr bench --suite cli` measures it), and a bad filter's error is one stderr line
naming the user's fields, not pymilvus' traceback and every internal field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_retrieval.demo import SHIPPED
from tests.helpers import TINY

HEAVY = ("torch", "open_clip", "torchvision", "transformers")
INTERNAL_FIELDS = ("mtime_ns", "content_hash", "text_vector", "file_size", "media_id", "has_image")

# Each case in one fresh interpreter, in order: its exit code, its stderr, and the heavy modules
# loaded so far (none may be, by any case).
PROBE = """
import contextlib, io, json, sys

from mm_retrieval.cli import main

heavy, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
report = []
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    report.append({"argv": argv, "code": code, "err": err.getvalue(), "heavy": sorted(m for m in heavy if m in sys.modules)})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """8 images indexed with the tiny model (collection 'images'), and a table without 'path'."""
    from mm_retrieval import Pipeline
    from tests.helpers import COLORS, make_image

    root = tmp_path_factory.mktemp("checks")
    for i, (name, rgb) in enumerate(COLORS.items()):
        make_image(root / "photos" / f"{name}.png", rgb, seed=i)
    db = str(root / "mmr.db")
    with Pipeline(db=db, encoder={**TINY, "workers": 0, "batch_size": 4}) as pipe:
        pipe.index(root / "photos", progress=False)
    (root / "no-path.csv").write_text("file,caption\nred.png,a red picture\n")
    return root, db


def probe(cwd: Path, cases: list[list[str]]) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(cases)], capture_output=True,
                         text=True, cwd=cwd, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_errors_checkable_without_a_model_come_before_any_model_is_imported(collection):
    root, db = collection
    photos, table, image = str(root / "photos"), str(root / "no-path.csv"), str(root / "photos" / "red.png")
    other = ["--model", "ViT-B-32", "--pretrained", "none"]
    cases = {
        "unknown field": ["search", "a red picture", "--db", db, "--filter", "nosuch > 3"],
        "syntax": ["search", "a red picture", "--db", db, "--filter", 'metadata["year"] >'],
        "no path column": ["index", table, "--db", db, "--collection", "table", "--model", "mmr-tiny", "--pretrained", "none"],
        "no path column, sync": ["sync", table, "--db", db],
        "other model, search": ["search", "a red picture", "--db", db, *other],
        "other model, tag not checked yet": ["search", "a red picture", "--db", db, "--model", "ViT-B-32", "--pretrained", "openai"],
        "other model, index": ["index", photos, "--db", db, *other],
        "other model, sync": ["sync", photos, "--db", db, *other],
        "missing collection, search": ["search", "a red picture", "--db", db, "--collection", "nope"],
        "missing collection, explain": ["explain", "a red picture", image, "--db", db, "--collection", "nope",
                                        "--rerank", str(SHIPPED / "reranker")],
        "filter with the reranker on": ["search", "a red picture", "--db", db, "--filter", "nosuch > 3",
                                        "--rerank", str(SHIPPED / "reranker")],
    }
    report = dict(zip(cases, probe(root, list(cases.values()))))
    for name, r in report.items():
        assert r["code"] == 2, (name, r)
        assert r["heavy"] == [], f"{name}: {r['heavy']} imported before the error ({r['err']})"
        assert len(r["err"].strip().splitlines()) == 1 and r["err"].startswith("error: "), (name, r["err"])
    err = {name: r["err"] for name, r in report.items()}
    assert "unknown field 'nosuch' at column 1" in err["unknown field"]
    assert "unexpected end of expression" in err["syntax"]
    for name in ("unknown field", "syntax", "filter with the reranker on"):
        assert "path, caption and metadata" in err[name]
        assert not any(f in err[name] for f in INTERNAL_FIELDS), err[name]  # the user's fields only
    assert "has no 'path' column (columns: file, caption)" in err["no path column"] and "no-path.csv" in err["no path column"]
    assert "has no 'path' column" in err["no path column, sync"]
    for name in ("other model, search", "other model, tag not checked yet", "other model, index", "other model, sync"):
        assert "was built with model mmr-tiny" in err[name] and "but the current model is ViT-B-32" in err[name]
    for name in ("missing collection, search", "missing collection, explain"):
        assert "collection 'nope' does not exist" in err[name] and "it holds --collection images" in err[name]
    assert not (root / "table").exists() and not list(root.glob("*.db.mmr/table"))  # a refused index run writes nothing


def test_a_missing_database_is_said_and_not_created(tmp_path):
    from mm_retrieval.cli import main

    db = tmp_path / "none.db"
    assert main(["search", "a red picture", "--db", str(db)]) == 2
    assert not db.exists()


def test_another_model_is_refused_from_files_alone():
    """What the encoder tells the collection before loading is what it records after: the same
    fingerprint, with open_clip not imported for it."""
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    for params in (TINY, {"model": "ViT-B-32", "pretrained": "none"}, {"model": str(SHIPPED / "encoder")}):
        enc = OpenClipEncoder(params)
        cheap = enc.cheap_info()
        full = enc.info()
        assert cheap["fingerprint"] == full["fingerprint"] and cheap["dim"] == full["dim"], params


# ---- item 2: one line, unless --verbose ----------------------------------------------------------
def mmr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1"}.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run([sys.executable, "-m", "mm_retrieval", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def test_a_bad_filter_is_one_stderr_line_and_verbose_shows_milvus_own_log(collection):
    root, db = collection
    out = mmr("search", "a red picture", "--db", db, "--filter", "nosuch > 3", cwd=root)
    assert out.returncode == 2 and out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: invalid filter expression 'nosuch > 3': unknown field 'nosuch'")
    verbose = mmr("-v", "search", "a red picture", "--db", db, "--filter", "nosuch > 3", cwd=root)
    assert verbose.returncode == 2 and "_log_rpc_error" in verbose.stderr  # pymilvus' own log, when asked for
