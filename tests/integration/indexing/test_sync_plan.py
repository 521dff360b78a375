"""`mmr sync --dry-run` says what the run will do (broken files, copies and moves included), and
every report names its duplicates: which file is a copy of which."""

from __future__ import annotations

import json
import shutil

import httpx

from mm_retrieval import Pipeline
from tests.helpers import TINY, make_image


def _rows(pipe) -> dict[str, str]:
    return {r["path"]: r["id"] for r in pipe.store.iter_rows(("path",))}


def test_the_dry_run_plans_what_the_run_does(tmp_path, image_folder, capsys):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0})
    pipe.index(image_folder, progress=False)
    # what a user's folder gains: three broken files, a copy of an indexed photo, a new photo and
    # its copy, a photo moved into a subfolder; and one deleted
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "truncated.png").write_bytes((image_folder / "blue.png").read_bytes()[:120])
    shutil.copy(image_folder / "green.png", image_folder / "green copy.png")
    make_image(image_folder / "new.png", (9, 99, 199), seed=42)
    shutil.copy(image_folder / "new.png", image_folder / "new2.png")
    (image_folder / "moved").mkdir()
    (image_folder / "purple.png").rename(image_folder / "moved" / "purple.png")
    (image_folder / "white.png").unlink()
    before = _rows(pipe)

    dry = pipe.sync(image_folder, dry_run=True)
    assert _rows(pipe) == before  # a dry run changes nothing
    real = pipe.sync(image_folder, progress=False)
    after = _rows(pipe)

    assert [(f.path, f.error) for f in dry.failed] == [(f.path, f.error) for f in real.failed]
    assert sorted(f.path.rsplit("/", 1)[1] for f in real.failed) == ["broken.jpg", "empty.png", "truncated.png"]
    assert dry.duplicate_files == real.duplicate_files
    assert sorted((d.path, d.of) for d in real.duplicate_files) == sorted([
        (str(image_folder / "green copy.png"), str(image_folder / "green.png")),
        (str(image_folder / "new2.png"), str(image_folder / "new.png")),
    ])
    plan = dry.plan
    new_content = [p for p, i in after.items() if i not in before.values()]
    assert plan["add"] == new_content == [str(image_folder / "new.png")]
    assert real.indexed == len(plan["add"]) + len(plan["replace"]) == 1
    assert plan["moved"] == [{"path": str(image_folder / "moved" / "purple.png"), "from": str(image_folder / "purple.png")}]
    assert real.moved == 1 and real.removed == len(plan["remove"]) == 1

    # the CLI's plan says the same, in words
    from mm_retrieval.cli import main

    (image_folder / "green copy 2.png").write_bytes((image_folder / "green.png").read_bytes())
    assert main(["sync", str(image_folder), "--dry-run", "--db", str(tmp_path / "mmr.db"), "--model", "mmr-tiny", "--pretrained", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would add 0, replace 0 (content changed), move 0, remove 0;")
    assert "3 unreadable" in out and "3 duplicates" in out  # the two known copies and the new one
    assert f"duplicate {image_folder / 'green copy 2.png'}: same content as {image_folder / 'green.png'}" in out


def test_duplicates_are_named_and_a_duplicates_path_reranks_as_its_item(tmp_path, image_folder, capsys):
    from mm_retrieval.cli import main
    from mm_retrieval.server.app import create_app
    from mm_retrieval.server.background import BackgroundServer
    from mm_retrieval.server.engine import Engine

    original, copy = image_folder / "blue.png", image_folder / "nested" / "blue again.png"
    shutil.copy(original, copy)
    db = str(tmp_path / "mmr.db")
    assert main(["index", str(image_folder), "--db", db, "--model", "mmr-tiny", "--pretrained", "none", "--workers", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["duplicates"] == 1 and doc["duplicate_files"] == [{"path": str(copy), "of": str(original)}]
    touched = image_folder / "green.png"
    touched.write_bytes(touched.read_bytes())  # a new mtime: re-read, same content (not a copy)
    assert main(["index", str(image_folder), "--db", db, "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"duplicate {copy}: same content as {original}" in out and out.count("duplicate ") == 1

    pipe = Pipeline(db=db, encoder={"workers": 0})
    with BackgroundServer(create_app(Engine(pipe))) as server:
        reply = httpx.post(f"{server.url}/v2/rerank", json={"model": "m", "query": "a blue picture",
                                                             "documents": [str(original), str(copy), str(image_folder / "green.png")]},
                           timeout=60)
        assert reply.status_code == 200, reply.text
        scores = {r["index"]: r["relevance_score"] for r in reply.json()["results"]}
        assert scores[1] == scores[0] != scores[2]  # the copy is scored as the item it copies
        gone = httpx.post(f"{server.url}/v2/rerank", json={"model": "m", "query": "q", "documents": [str(tmp_path / "nope.png")]},
                          timeout=60)
        assert gone.status_code == 400 and "nope.png" in gone.text
