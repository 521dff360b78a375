"""What a new user meets in the first hour (issue 17): results on stdout, nothing left behind by a
read-only or failed command, a model that can't be fetched failing fast, help for every option."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mm_retrieval.cli import cli, main
from tests.helpers import TINY, free_port, make_image

TINY_ARGS = ["--model", "mmr-tiny", "--pretrained", "none"]
README = Path(__file__).resolve().parents[3] / "README.md"


def mmr(*args: str, cwd: Path, env: dict[str, str] | None = None, shell_tail: str = "") -> subprocess.CompletedProcess:
    """``mmr ARGS`` in a subprocess, stdout and stderr captured apart (``shell_tail``: a pipe such as '| head -n 2').
    ``env`` overrides the environment (HF_HUB_OFFLINE=1 unless given; a None value unsets a variable)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, "-m", "mm_retrieval", *args]
    if shell_tail:
        import shlex

        return subprocess.run(" ".join(map(shlex.quote, cmd)) + " " + shell_tail, shell=True, capture_output=True,
                              text=True, cwd=cwd, env=env, timeout=300)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def indexed(tmp_path, image_folder):
    """``image_folder`` indexed with the tiny model into tmp_path/mmr.db; yields the db path."""
    from mm_retrieval import Pipeline

    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={**TINY, "workers": 0, "batch_size": 4}) as pipe:
        pipe.index(image_folder, progress=False)
    return db


# ---- item 7: results on stdout, the rest on stderr ----------------------------------------------
def test_search_hits_reach_a_pipe(tmp_path, indexed):
    out = mmr("search", "a red picture", "--db", indexed, "--k", "3", cwd=tmp_path, shell_tail="| head -n 20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "3 hits for 'a red picture'" in lines[0]
    assert [line.split(".")[0].strip() for line in lines if re.match(r"\s*\d+\.", line)] == ["1", "2", "3"]
    assert "hits for" not in out.stderr and not re.search(r"^\s*1\.", out.stderr, re.M)  # stderr: logs and warnings only


def test_plugins_listing_on_stdout(tmp_path):
    out = mmr("plugins", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "encoder/open_clip" in out.stdout and "store/milvus" in out.stdout
    assert "encoder/open_clip" not in out.stderr


def test_human_reports_on_stdout_json_unchanged(tmp_path, image_folder, capsys):
    db = str(tmp_path / "mmr.db")
    assert main(["index", str(image_folder), "--db", db, *TINY_ARGS, "--workers", "0", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "indexed 8" in cap.out and "indexed 8" not in cap.err
    assert main(["cache", "info", "--db", db]) == 0
    cap = capsys.readouterr()
    assert "collection 'images': 8 items" in cap.out and "items" not in cap.err
    assert main(["cache", "info", "--db", db, "--json"]) == 0
    assert '"items": 8' in capsys.readouterr().out


# ---- item 6: a read-only or failed command creates nothing ----------------------------------------
@pytest.mark.parametrize("db_arg", [None, "nonexistent/dir/mmr.db"])
def test_read_only_commands_create_no_database(tmp_path, monkeypatch, capsys, db_arg):
    work = tmp_path / "work"
    work.mkdir()
    image = work / "img.png"
    make_image(image, (200, 30, 30))
    (work / "table.csv").write_text("path,caption\nimg.png,a red picture\n")
    (work / "missing.csv").write_text("path,caption\ngone.png,a red picture\n")
    monkeypatch.chdir(work)
    before = tree(work)
    db = ["--db", db_arg] if db_arg else []
    commands = [
        ["search", "a dog", *db],
        ["search", "--image", str(image), *db],
        ["cache", "info", *db],
        ["explain", "a dog", str(image), *db],
        ["eval", "table.csv", "--no-index", *db, *TINY_ARGS],
        ["eval", "missing.csv", *db, *TINY_ARGS],  # indexes first, but its one image is gone
        ["serve", *db, "--port", str(free_port())],
    ]
    for args in commands:
        rc = main(args)
        err = capsys.readouterr().err
        if args[0] != "cache":
            assert rc != 0, (args, err)
            assert err.count("\n") == 1 and err.startswith("error: "), (args, err)  # one line
        assert tree(work) == before, (args, tree(work) - before)
    assert not (work / "mmr.db").exists() and not (work / "nonexistent").exists()


def test_index_of_an_empty_source_creates_nothing(tmp_path, capsys):
    db = tmp_path / "mmr.db"
    empty = tmp_path / "empty"
    empty.mkdir()
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,caption\n")
    missing = tmp_path / "missing.csv"
    missing.write_text("path,caption\nnot-there.png,a red picture\n")
    for source in (empty, header_only, missing):
        assert main(["index", str(source), "--db", str(db), *TINY_ARGS, "--workers", "0", "--no-progress"]) == 0
        cap = capsys.readouterr()
        assert "indexed 0" in cap.out
        assert "nothing to index" in cap.err and "no collection was created" in cap.err
        assert not db.exists() and not (tmp_path / "mmr.db.mmr").exists(), source
    assert "not-there.png" in cap.out  # the failed row is listed
    # searching afterwards says there is nothing, instead of "0 hits"
    assert main(["search", "a red picture", "--db", str(db)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- item 5: offline fails fast, after the model-mismatch check -----------------------------------
def _unreachable_hub(tmp_path: Path) -> dict[str, str | None]:
    """Online mode, but a hub that refuses connections (a closed port) and an empty Hugging Face cache."""
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "HF_HOME": str(tmp_path / "hf")}


def test_uncached_weights_offline_fail_fast_with_one_line(tmp_path, image_folder):
    """A hub that can't be reached. The same with HF_HUB_OFFLINE=1 is `mmr bench --suite cli`'s
    `uncached_weights_offline` case, which also measures how fast it fails (test_bench.py checks
    its message); neither is timed here."""
    work = tmp_path / "work"
    work.mkdir()
    out = mmr("index", str(image_folder), "--no-progress", cwd=work, env=_unreachable_hub(tmp_path))  # the default model, ViT-B-32
    assert out.returncode == 2, out.stderr  # at once: no retries (the old behaviour: ~57 s of them)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch the weights for ViT-B-32"), out.stderr
    assert "--pretrained PATH" in lines[0] and "can't be reached" in lines[0]
    assert os.listdir(work) == []  # no ./mmr.db, no token cache


def test_model_mismatch_is_reported_before_any_download(tmp_path, indexed, image_folder):
    env = _unreachable_hub(tmp_path)
    for args in (["index", str(image_folder), "--no-progress"], ["search", "a red picture"]):
        out = mmr(*args, "--db", indexed, "--model", "ViT-B-32", cwd=tmp_path, env=env)
        assert out.returncode == 2, out.stderr
        assert "was built with model" in out.stderr and "can't be reached" not in out.stderr, out.stderr


def test_cached_weights_are_loaded_without_asking_the_hub(tmp_path):
    """Weights in the Hugging Face cache (here: a file in the hub cache layout, not a real
    checkpoint) are read from it: the load fails on the file's content, not on the hub."""
    from mm_retrieval.errors import ModelLoadError
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors").write_bytes(b"not a checkpoint")
    uncached = OpenClipEncoder(model="ViT-B-32", cache_dir=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="they are not in .*empty and HF_HUB_OFFLINE is set"):
        uncached.warm_up()
    cached = OpenClipEncoder(model="ViT-B-32", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(Exception) as e:
        cached.warm_up()
    assert "SafetensorError" in str(e.value) and "they are not in" not in str(e.value)  # it read the cached file


def test_embedding_width_known_without_loading_the_model():
    from mm_retrieval.stages.encoders.open_clip import OpenClipEncoder

    enc = OpenClipEncoder(**TINY)
    width = enc.info()["dim"]  # before warm_up: from the config
    assert not enc._warm
    enc.warm_up()
    assert enc.info()["dim"] == width == enc.encode_text(["a"]).shape[1]
    assert OpenClipEncoder(model="ViT-B-32").dim == 512  # no download needed to know it


# ---- item 9: help for every option, every command in the README -----------------------------------
def _commands(group: click.Group, prefix: str = "mmr"):
    for name, cmd in group.commands.items():
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix} {name}")


def test_every_option_has_help_text():
    missing = [f"{path} {'/'.join(p.opts)}" for path, cmd in _commands(cli) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert missing == []


def test_readme_command_table_lists_every_command():
    text = README.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `mmr ")]
    listed = {m.group(1) for line in table for m in re.finditer(r"`mmr ([a-z-]+)", line)}
    commands = {name for name in cli.commands}
    assert commands - listed == set()
    assert "download.pytorch.org/whl/cpu" in text and "pip install torch==" in text
