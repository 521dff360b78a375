"""Kill `mmr index` with SIGKILL at chosen points and start it again at once, as a supervisor
(systemd ``Restart=``, Kubernetes) would: nothing the killed run started holds the database or
the collection's write lock, and the new run resumes to every image exactly once, tokens for
every row, no orphan tokens, and work already done not redone."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.errors import InputError
from mm_retrieval.locks import LOCK_FILE, CollectionLock, holders
from mm_retrieval.tokencache import cache_root, caches_in, open_existing
from tests.helpers import make_image

N = 24  # 6 batches of 4
ARGS = ["--model", "mmr-tiny", "--pretrained", "none", "--batch-size", "4", "--workers", "2", "--json", "--no-progress"]
RESTART_WITHIN_S = 0.5


class Run:
    """One `mmr index` process. Its output goes to files, not pipes: waiting for it waits for
    the process alone, not for whatever inherited its stdout. ``token`` marks every process it
    starts (their environment), so the test can find any that outlive it."""

    def __init__(self, tmp_path, folder, db, collection, failpoint=None):
        self.token = uuid.uuid4().hex
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMR_TEST_RUN": self.token}
        env.pop("MMR_FAILPOINTS", None)
        if failpoint:
            env["MMR_FAILPOINTS"] = failpoint
        self.out, self.err = tmp_path / f"{self.token}.out", tmp_path / f"{self.token}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mm_retrieval", "index", str(folder), "--db", str(db), "--collection", collection, *ARGS],
                stdout=out, stderr=err, env=env,
            )

    def wait(self) -> int:
        return self.proc.wait(timeout=300)

    def stderr(self) -> str:
        return self.err.read_text()[-3000:]

    def report(self) -> dict:
        return json.loads(self.out.read_text())

    def survivors(self) -> list[int]:
        """Live processes this run started (found by the token in their environment)."""
        return _survivors(self.token)


def _survivors(token: str) -> list[int]:
    """Live processes whose environment carries ``MMR_TEST_RUN=token``."""
    mark = f"MMR_TEST_RUN={token}".encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        with open(f"/proc/{d}/stat") as s:
                            if s.read().rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                                found.append(int(d))
            except OSError:
                continue
    return found


def _locks(db, collection):
    """The files whose holder blocks the next run: the collection's write lock and, for Milvus
    Lite, the database's own lock."""
    files = [cache_root(str(db), collection) / LOCK_FILE]
    if "://" not in str(db):
        files.append(db / "LOCK")
    return files


def _state(db, collection):
    with Pipeline(db=str(db), collection=collection) as pipe:  # closed after: Milvus Lite admits one process at a time
        rows = list(pipe.store.iter_rows(("id", "path")))
        caches = [open_existing(p) for p in caches_in(pipe.store.cache_dir())]
    return rows, [set(c.ids()) for c in caches]


def _kill_and_restart(tmp_path, folder, db, failpoint, collection="images") -> dict:
    """Run with ``failpoint`` armed; the moment it is dead, check nothing it started holds a lock
    and start it again; returns the second run's report."""
    killed = Run(tmp_path, folder, db, collection, failpoint)
    assert killed.wait() == -signal.SIGKILL, killed.stderr()
    dead = time.monotonic()
    held = {str(f): holders(f) for f in _locks(db, collection)}
    again = Run(tmp_path, folder, db, collection)
    assert time.monotonic() - dead < RESTART_WITHIN_S
    assert not any(held.values()), f"still held after the kill: {held}"
    deadline = time.monotonic() + 2
    while killed.survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.survivors() == [], "processes of the killed run outlived it by more than 2 s"
    assert again.wait() == 0, again.stderr()
    return again.report()


def _check_complete(db, collection="images"):
    rows, token_ids = _state(db, collection)
    paths = [r["path"] for r in rows]
    assert len(rows) == N and len(set(paths)) == N  # every image exactly once
    assert len(token_ids) == 1 and token_ids[0] == {r["id"] for r in rows}  # tokens for every row, no orphans


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(N):
        make_image(root / f"{i:03d}.png", (i * 10 % 256, 255 - i * 7, (i * 37) % 256), seed=i)
    return root


# batch_decoded / mid_tokens / after_tokens / after_upsert: the index run's own steps;
# mid_slot: in the middle of one slot's bytes (the 9th image: the 3rd batch's first);
# decoding: the run dies while a decoding worker is busy with a file
# CI kills at two points (a worker busy decoding; rows stored); the others are `extended`.
FAILPOINTS = [pytest.param("batch_decoded=3", marks=pytest.mark.extended), pytest.param("mid_tokens=3", marks=pytest.mark.extended),
              pytest.param("mid_slot=9", marks=pytest.mark.extended), pytest.param("after_tokens=3", marks=pytest.mark.extended),
              "after_upsert=4", "decoding=6"]


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_killed_index_restarted_at_once_resumes_on_milvus_lite(tmp_path, folder, failpoint):
    db = tmp_path / "mmr.db"
    report = _kill_and_restart(tmp_path, folder, db, failpoint)
    assert report["indexed"] + report["unchanged"] == N
    if not failpoint.startswith("decoding"):  # 2-3 of 6 batches landed before the kill: not redone
        assert 0 < report["indexed"] < N
    _check_complete(db)


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["decoding=6", pytest.param("after_upsert=4", marks=pytest.mark.extended)])
def test_killed_index_restarted_at_once_resumes_on_a_milvus_server(tmp_path, folder, milvus_server, failpoint):
    collection = f"crash_{failpoint.split('=')[0]}"
    report = _kill_and_restart(tmp_path, folder, milvus_server, failpoint, collection)
    assert report["indexed"] + report["unchanged"] == N
    _check_complete(milvus_server, collection)


# One process indexes twice, as a server or a watch loop would; the first run's fork server (the
# decoding workers' parent, mm_retrieval.workers) is SIGKILLed while a worker decodes.
_SERVER_KILLED = """
import json, sys, time
from mm_retrieval import Pipeline
from mm_retrieval.errors import StageError

if __name__ == "__main__":
    folder, db = sys.argv[1], sys.argv[2]
    with Pipeline(db=db, encoder={"model": "mmr-tiny", "pretrained": "none", "batch_size": 4, "workers": 2}) as pipe:
        try:
            pipe.index(folder, progress=False)
            print(json.dumps({"first": "completed"}), flush=True)
        except StageError as e:
            print(json.dumps({"first": str(e)}), flush=True)
        print(json.dumps({"again": pipe.index(folder, progress=False).to_dict()}), flush=True)
"""


@pytest.mark.slow
def test_killed_fork_server_fails_the_run_clearly_and_the_next_run_starts_a_new_one(tmp_path, folder):
    db, once = tmp_path / "mmr.db", tmp_path / "once"
    once.mkdir()
    token = uuid.uuid4().hex
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMR_TEST_RUN": token, "MMR_FAILPOINTS": "fork_server=6",
           "MMR_FAILPOINT_ONCE_DIR": str(once)}  # the second run's new fork server is not killed again
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _SERVER_KILLED, str(folder), str(db)], stdout=f,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, again = (json.loads(line) for line in out.read_text().splitlines())
    assert (once / "fork_server").exists()
    assert "fork server" in first["first"] and "killed by signal 9" in first["first"], first
    assert again["again"]["indexed"] + again["again"]["unchanged"] == N
    deadline = time.monotonic() + 2
    while _survivors(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _survivors(token) == [], "the fork server or a worker outlived the process by more than 2 s"
    _check_complete(db)


@pytest.mark.slow
def test_killed_while_replacing_changed_files(tmp_path, folder):
    db = tmp_path / "mmr.db"
    first = Run(tmp_path, folder, db, "images")
    assert first.wait() == 0, first.stderr()
    for i in range(0, 12, 2):  # change 6 files: two batches of new content
        make_image(folder / f"{i:03d}.png", (1, 2, 3 + i), seed=1000 + i)
    killed = Run(tmp_path, folder, db, "images", "after_upsert=1")  # new rows stored, old ones not yet deleted
    assert killed.wait() == -signal.SIGKILL, killed.stderr()
    rows, _ = _state(db, "images")
    assert len(rows) > N  # the kill left some paths listed twice...

    again = Run(tmp_path, folder, db, "images")
    assert again.wait() == 0, again.stderr()
    rows, token_ids = _state(db, "images")
    assert len(rows) == N and len({r["path"] for r in rows}) == N  # ...which the next run repairs
    assert token_ids[0] == {r["id"] for r in rows}


def test_second_concurrent_writer_is_refused_clearly(tmp_path, folder):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0})
    pipe.index(folder, progress=False)
    with CollectionLock(pipe.store.cache_dir(), "images"):
        # another process holds the write lock (flock is per open file, so this models it)
        with pytest.raises(InputError, match=f"being written by mmr pid {os.getpid()}"):
            pipe.index(folder, progress=False)


def test_lock_held_by_a_process_that_is_not_an_mmr_run_is_named(tmp_path, folder):
    """E.g. a child that inherited the lock from a run that died: the message names its pid."""
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={"model": "mmr-tiny", "pretrained": "none", "workers": 0})
    lock = pipe.store.cache_dir() / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    lock.write_text(f"mmr pid {dead} since 2024-01-01 00:00:00")  # what a killed run leaves in the file
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError) as e:
            pipe.index(folder, progress=False)
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "not an mmr index run" in msg and f"kill {holder.pid}" in msg
        assert f"mmr pid {dead}, which has exited" in msg
    finally:
        holder.kill()
        holder.wait()
    assert pipe.index(folder, progress=False).indexed == N  # released with its holder
