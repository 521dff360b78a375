"""`mmr watch FOLDER`: files copied in, renamed and deleted while it runs are indexed, moved and
removed as `mmr sync` would; SIGKILL mid-sync and a restart lose and duplicate nothing."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mm_retrieval import Pipeline
from tests.helpers import TINY, make_image

pytestmark = pytest.mark.slow  # subprocesses of the CLI, each loading a model


class Watcher:
    def __init__(self, folder: Path, db: Path, log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mm_retrieval", "watch", str(folder), "--db", str(db), "--model", "mmr-tiny",
             "--pretrained", "none", "--debounce", "0.3"],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            assert self.proc.poll() is None, f"mmr watch exited ({self.proc.returncode}):\n{self.text()}"
            assert time.monotonic() < deadline, f"no {needle!r} x{count} in time:\n{self.text()}"
            time.sleep(0.1)


def _state(db: Path) -> list[str]:
    with Pipeline(db=str(db), encoder={**TINY, "workers": 0}) as pipe:
        rows = list(pipe.store.iter_rows(("id", "path")))
    assert len({r["id"] for r in rows}) == len(rows)
    return sorted(r["path"] for r in rows)


def test_watch_follows_copies_renames_deletes_and_survives_sigkill(tmp_path):
    lib, db, src = tmp_path / "Pictures", tmp_path / "mmr.db", tmp_path / "camera"
    make_image(lib / "a.png", (200, 30, 30), seed=1)
    make_image(lib / "b.png", (30, 200, 30), seed=2)
    for i, name in enumerate(["c.png", "d.jpg", "e.png", "f.png"]):
        make_image(src / name, (40 * i, 90, 250 - 40 * i), seed=10 + i)

    # the second write of tokens (the first batch after the start's sync) kills the watcher mid-sync
    first = Watcher(lib, db, tmp_path / "first.log", env={"MMR_FAILPOINTS": "after_tokens=2"})
    try:
        first.wait_for("full sync (start)")
        shutil.copy(src / "c.png", lib / "c.png")
        (lib / "sub").mkdir()
        shutil.copy(src / "d.jpg", lib / "sub" / "d.jpg")
        (lib / "b.png").rename(lib / "sub" / "b-renamed.png")
        (lib / "a.png").unlink()
        assert first.proc.wait(timeout=120) == -signal.SIGKILL, first.text()
    finally:
        first.proc.kill()
    assert f"+ {lib / 'c.png'}" in first.text()  # its line came before the sync it died in

    second = Watcher(lib, db, tmp_path / "second.log")
    try:
        second.wait_for("full sync (start)")  # catches up with what the killed run left undone
        shutil.copy(src / "e.png", lib / "sub" / "e.png")
        second.wait_for(f"+ {lib / 'sub' / 'e.png'}")
        second.wait_for("\n  indexed 1, replaced 0, moved 0, removed 0")  # a batch's summary (the start's reads "full sync")
        (lib / "sub" / "e.png").rename(lib / "e-moved.png")
        second.wait_for(f"> {lib / 'sub' / 'e.png'} -> {lib / 'e-moved.png'}")
        second.wait_for("\n  indexed 0, replaced 0, moved 1, removed 0")  # its vector kept
        (lib / "c.png").unlink()
        second.wait_for(f"- {lib / 'c.png'}")
        second.wait_for("\n  indexed 0, replaced 0, moved 0, removed 1")
        second.proc.send_signal(signal.SIGINT)
        assert second.proc.wait(timeout=60) == 0, second.text()
        assert "stopped" in second.text()
    finally:
        second.proc.kill()

    on_disk = sorted(str(p) for p in lib.rglob("*") if p.is_file())
    assert on_disk == sorted(str(lib / p) for p in ["sub/d.jpg", "sub/b-renamed.png", "e-moved.png"])
    assert _state(db) == on_disk  # nothing lost, nothing twice


def test_serve_watch_makes_a_copied_file_searchable_over_http(tmp_path):
    import httpx

    from tests.helpers import free_port

    lib, db = tmp_path / "Pictures", tmp_path / "mmr.db"
    make_image(lib / "a.png", (200, 30, 30), seed=1)
    with Pipeline(db=str(db), encoder={**TINY, "workers": 0}) as pipe:  # closed: Milvus Lite admits one process
        pipe.index(lib, progress=False)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mm_retrieval", "serve", "--db", str(db), "--port", str(port),
                             "--model", "mmr-tiny", "--pretrained", "none", "--watch", str(lib), "--no-access-log"],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 180
        while "full sync (start)" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        make_image(lib / "new.png", (30, 30, 200), seed=2)
        body = {"query": "a picture", "mode": "image", "rerank": False, "filter": f'path == "{lib / "new.png"}"'}
        while True:
            hits = httpx.post(f"http://127.0.0.1:{port}/search", json=body, timeout=30).json()["hits"]
            if hits:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert hits[0]["path"] == str(lib / "new.png") and "taken" in hits[0]["metadata"]
        assert f"+ {lib / 'new.png'}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
