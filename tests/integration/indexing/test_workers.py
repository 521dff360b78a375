"""Decoding workers die with the index run that started them, from their first moment (no torch
needed here: the workers below only sleep)."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

_WORKER = ("import sys, time; from mm_retrieval.workers import start_worker; start_worker(int(sys.argv[1])); "
           "print('armed', flush=True); time.sleep(60)")
_RUN = f"""
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", {_WORKER!r}, str(os.getpid())], stdout=subprocess.PIPE, text=True)
assert worker.stdout.readline().strip() == "armed"
print(worker.pid, flush=True)
time.sleep(60)
"""
# A spawned worker whose target's module takes 30 s to import (as torch takes seconds).
_SLOW_MODULE = """
import os, time
if os.environ.get("SLOW_START"):
    time.sleep(30)

def idle():
    time.sleep(60)
"""
_SPAWNING_RUN = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import slow_start
from mm_retrieval.workers import worker_context
os.environ["SLOW_START"] = "1"  # only the worker's import of slow_start is slow
p = worker_context().Process(target=slow_start.idle)
p.start()
print(p.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _kill_run_then_worker_is_gone(run: subprocess.Popen, worker: int, within_s: float = 1.0) -> None:
    assert not _gone(worker)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + within_s
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(worker), f"the worker outlived the run by more than {within_s} s"


def test_worker_dies_as_soon_as_the_run_is_killed():
    run = subprocess.Popen([sys.executable, "-c", _RUN], stdout=subprocess.PIPE, text=True)
    try:
        _kill_run_then_worker_is_gone(run, int(run.stdout.readline()))
    finally:
        run.kill()


def test_worker_whose_run_died_before_it_was_armed_exits_at_once():
    """The run's death can come before the signal is armed: the worker sees it is no longer the
    run's child and exits."""
    out = subprocess.run([sys.executable, "-c", _WORKER, str(os.getpid() + 10**6)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "armed" not in out.stdout, out.stderr


def test_spawned_worker_dies_with_the_run_while_still_starting_up(tmp_path):
    """Armed before its target is unpickled: a run killed while its workers import torch does
    not leave them running until their imports finish."""
    (tmp_path / "slow_start.py").write_text(_SLOW_MODULE)
    run = subprocess.Popen([sys.executable, "-c", _SPAWNING_RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(run.stdout.readline())
        time.sleep(1.5)  # the worker is inside `import slow_start` by now
        _kill_run_then_worker_is_gone(run, worker)
    finally:
        run.kill()


_HOLDING_RUN = """
import sys, threading, time
from mm_retrieval.workers import worker_context

if __name__ == "__main__":
    held = open(sys.argv[1], "a")  # stands for the database and lock files an index run holds
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # ... and its gRPC threads
    p = worker_context().Process(target=time.sleep, args=(60,))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


def _open_files(pid: int) -> set[str]:
    """What ``pid``'s descriptors point at; one closed between the listing and the read is skipped."""
    files = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return files


def test_worker_is_forked_from_a_process_without_the_runs_files_or_threads(tmp_path):
    """Workers come from the fork server (a fresh interpreter), not from the run: none of the
    run's descriptors, and the process they are forked from has a single thread."""
    held = tmp_path / "mmr.db.lock"
    run = subprocess.Popen([sys.executable, "-c", _HOLDING_RUN, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(run.stdout.readline())
        with open(f"/proc/{worker}/stat") as f:
            server = int(f.read().rsplit(")", 1)[1].split()[1])  # the worker's parent
        assert server != run.pid
        for pid in (worker, server):
            assert str(held) not in _open_files(pid), pid
        assert len(os.listdir(f"/proc/{server}/task")) == 1  # forking a multi-threaded process can hang the child
        _kill_run_then_worker_is_gone(run, worker)
        assert _gone(server)
    finally:
        run.kill()
