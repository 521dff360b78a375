"""The `mmr` command as a user runs it: a subprocess (or, where what it prints is tested, the CLI in
this process), JSON on stdout, errors as exit codes."""

import json
import os
import subprocess
import sys

import pytest

from mm_retrieval.cli import main

TINY_ARGS = ["--model", "mmr-tiny", "--pretrained", "none"]


def mmr(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mm_retrieval", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow  # an `mmr` process and a decode worker
def test_index_then_search_json(tmp_path, image_folder, monkeypatch, capsys):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = mmr("index", str(image_folder), *TINY_ARGS, "--workers", "1", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["indexed"] == 8 and doc["skipped"] == 1
    assert doc["failed"][0]["path"].endswith("broken.jpg") and doc["failed"][0]["error"]
    assert set(doc) >= {"indexed", "skipped", "failed", "seconds"}
    assert (tmp_path / "mmr.db").exists()  # the default --db

    # The searches run the CLI in this process (what they print is tested, not the process: a new
    # one would import torch again), in the same folder: the default --db.
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["search", "a red picture", "--k", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"] == "a red picture" and len(doc["hits"]) == 3
    assert [h["rank"] for h in doc["hits"]] == [1, 2, 3]

    assert main(["search", "a red picture", "--k", "2"]) == 0
    human = capsys.readouterr()
    assert "1." in human.out and "2." in human.out  # results: stdout
    assert "1." not in human.err


def test_empty_query_exit_code_2(tmp_path):
    out = mmr("search", "   ", cwd=tmp_path)
    assert out.returncode == 2
    assert "query is empty" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_collection_is_one_clear_line(tmp_path):
    out = mmr("search", "cat", "--db", str(tmp_path / "x.db"), "--collection", "nope", cwd=tmp_path)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "mmr index" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_teaches():
    out = mmr("--help")
    assert out.returncode == 0
    for cmd in ("index", "search", "plugins"):
        assert cmd in out.stdout
    out = mmr("search", "--help")
    assert "--candidates" in out.stdout and "--filter" in out.stdout
