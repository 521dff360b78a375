"""Decoding worker processes that hold nothing of their parent's, start in milliseconds, and die
with it.

An index run holds an open database (Milvus Lite's lock file, gRPC threads) and the collection's
write lock. A worker *forked* from it inherits those descriptors, and a forked copy of a process
with live gRPC threads can hang for good: orphaned workers then kept the database locked after
the run was killed, so a supervisor could not restart it. A *spawned* worker inherits nothing,
but imports torch and the transforms before its first image: about 4 s for two workers on a
2-core machine, a third of a 1000-image run (issue #30).

So on Linux workers are forked from a *fork server* (multiprocessing's ``forkserver``): a fresh
interpreter started with none of this process's descriptors but stdin/out/err, which imports
torch, PIL and the decoding code once (:data:`_PRELOAD`) and then forks each worker in milliseconds. It
is started once per process, by the first run that decodes in workers (a run of one batch decodes
in-process and starts nothing), and reused by every later index run, sync and cache build of the
process (a server or a watch loop keeps it for its lifetime). Dying with the run is a chain of parent-death signals (``PR_SET_PDEATHSIG``), each
armed before anything slow: the server's (by :mod:`mm_retrieval.worker_preload`, its first
import) fires when this process dies, each worker's (its first unpickled object) when the server
dies. A server killed on its own takes its workers with it: the run then fails with a clear error
and the next run starts a new server.

Elsewhere, or when this process's fork server was started by someone else (without that chain),
workers are *spawned* with the same parent-death guard, and torch's own watchdog ends orphans
within seconds where there is no parent-death signal.
"""

from __future__ import annotations

import ctypes
import multiprocessing.context
import os
import queue
import signal
import sys
import threading
from multiprocessing import forkserver
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# What the fork server imports before it forks anyone: the guard first (it arms the server's
# parent-death signal), then the script being run (as spawn would in every worker), then what
# every decoding worker runs: torch (its DataLoader worker loop, the batch tensors), PIL and its
# common plugins, the hash's DCT, the decoding code. Not torchvision or open_clip (~2.6 CPU
# seconds, as much as all the rest): the dataset hands workers open_clip's preprocessing as
# decode.ClipPreprocess; a transform it can't convert imports its own modules in each worker.
# Missing modules are skipped (ImportError).
_PRELOAD = ["mm_retrieval.worker_preload", "__main__", "torch", "torch.utils.data", "numpy", "PIL.Image",
            "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "scipy.fftpack", "mm_retrieval.decode"]

_server_pid: int | None = None  # set in the fork server (and so in every worker forked from it)


def start_worker(parent_pid: int) -> None:
    """Make this process die as soon as ``parent_pid``, its parent, does.

    On Linux the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``; strictly, on
    the exit of the parent *thread* that started the worker). A parent that died before the
    signal was armed is caught by comparing ``getppid()`` after arming it. Elsewhere torch's own
    watchdog ends orphaned workers within seconds."""
    _arm_parent_death_signal()
    if os.getppid() != parent_pid:  # orphaned already (re-parented to init or a subreaper)
        os._exit(0)


def _arm_parent_death_signal() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def arm_fork_server() -> None:
    """In the fork server, before its slow imports: die with the process that started it (a run
    killed while the server still imports torch takes it along). The thread that started it
    never exits before its process does (:func:`prepare_workers`). A run that died before this
    point is noticed by the server itself once its imports are done (its "alive" pipe is closed)."""
    global _server_pid
    _server_pid = os.getpid()
    _arm_parent_death_signal()


def _start_forked_worker() -> None:
    start_worker(_server_pid if _server_pid is not None else os.getppid())


class _DieWithParent:
    """Unpickled in the worker before anything else of its process object: arms
    :func:`start_worker` there (for a spawned worker, before it imports torch, which takes seconds)."""

    def __init__(self, parent_pid: int | None):
        self.parent_pid = parent_pid  # None: the fork server the worker is forked from

    def __reduce__(self) -> tuple[Any, ...]:
        if self.parent_pid is None:
            return _start_forked_worker, ()
        return start_worker, (self.parent_pid,)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    def __init__(self, *args: Any, **kwargs: Any):
        self._die_with_parent = _DieWithParent(os.getpid())  # first in __dict__: unpickled first
        super().__init__(*args, **kwargs)


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


class _ForkedWorkerProcess(multiprocessing.context.ForkServerProcess):
    def __init__(self, *args: Any, **kwargs: Any):
        self._die_with_parent = _DieWithParent(None)
        super().__init__(*args, **kwargs)


class _ForkedWorkerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkedWorkerProcess


class _ServerStarter(threading.Thread):
    """Starts the fork server on request, from a thread that lives as long as this process: the
    server's parent-death signal fires when the *thread* that started it exits, and a run may
    come from a short-lived thread (a web framework's pool)."""

    def __init__(self) -> None:
        super().__init__(name="mmr-worker-server", daemon=True)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.ours = False  # the process's fork server was started here, with the guard
        self.start()

    def run(self) -> None:
        while True:
            reply = self.requests.get()
            try:
                reply.put(self._ensure_running())
            except BaseException as e:  # handed to the caller
                reply.put(e)

    def _ensure_running(self) -> bool:
        server = forkserver._forkserver
        if not self.ours and getattr(server, "_forkserver_pid", None) is not None:
            return False  # started before, by someone else: its workers would not die with us
        forkserver.set_forkserver_preload(_PRELOAD)
        forkserver.ensure_running()  # returns at once; the server imports in the background
        self.ours = True
        return True


_starter: _ServerStarter | None = None
_starter_lock = threading.Lock()


def prepare_workers() -> bool:
    """Start this process's fork server if it is not running (it then loads torch and the rest
    in the background, so call this as early as a run knows it will decode in workers). False
    where workers are spawned instead (not Linux; a fork server started by someone else)."""
    global _starter
    if not sys.platform.startswith("linux"):
        return False
    with _starter_lock:
        if _starter is None:
            _starter = _ServerStarter()
    reply: queue.SimpleQueue = queue.SimpleQueue()
    _starter.requests.put(reply)
    result = reply.get()
    if isinstance(result, BaseException):
        raise result
    return result


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context for decoding workers (``DataLoader(multiprocessing_context=)``):
    forked from this process's fork server where :func:`prepare_workers` can use one, else spawned;
    either way each worker dies with the process that started it."""
    return _ForkedWorkerContext() if prepare_workers() else _WorkerContext()


def server_died() -> tuple[str, bool] | None:
    """When decoding workers died because this process's fork server did: (a sentence for the
    run's error, whether a signal killed it, e.g. the OOM killer); None while it runs. The dead
    server is left to be reaped, and replaced, by the next :func:`prepare_workers`."""
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None or _starter is None or not _starter.ours:
        return None
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    how = f"was killed by signal {info.si_status}" if killed else f"exited with status {info.si_status} (its error is above)"
    return f"the decoding workers' fork server (pid {pid}) {how}, and its workers with it", killed


__all__ = ["arm_fork_server", "prepare_workers", "server_died", "start_worker", "worker_context"]
