"""Decoding worker processes that hold nothing of their parent's and die with it.

An index run holds an open database (Milvus Lite's lock file, gRPC threads) and the collection's
write lock. A worker *forked* from it inherits those descriptors, and a forked copy of a process
with live gRPC threads can hang for good: orphaned workers then kept the database locked after
the run was killed, so a supervisor could not restart it. Workers are therefore *spawned* (a
fresh interpreter that inherits no descriptors but stdin/out/err) and arm a parent-death signal
(Linux ``PR_SET_PDEATHSIG``) as the very first thing they do, before importing torch.

Cost: each spawned worker imports torch and the encoder's transform modules before its first
image (3.8-6.3 s for two workers on a busy 2-core machine, measured with ``mmr-tiny``; a forked
one started in 0.05 s), which is why :func:`~mm_retrieval.stages.base.encode_files` decodes a
single batch in-process.
"""

from __future__ import annotations

import ctypes
import multiprocessing.context
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start_worker(parent_pid: int) -> None:
    """Make this process die as soon as ``parent_pid``, its parent, does.

    On Linux the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``; strictly, on
    the exit of the parent *thread* that started the worker: the one iterating the loader). A
    parent that died before the signal was armed is caught by comparing ``getppid()`` after
    arming it. Elsewhere torch's own watchdog ends orphaned workers within seconds."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # orphaned already (re-parented to init or a subreaper)
        os._exit(0)


class _DieWithParent:
    """Unpickled in the worker before anything else of its process object (so before torch is
    imported, which can take seconds): arms :func:`start_worker` there."""

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def __reduce__(self) -> tuple[Any, ...]:
        return start_worker, (self.parent_pid,)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    def __init__(self, *args: Any, **kwargs: Any):
        self._die_with_parent = _DieWithParent(os.getpid())  # first in __dict__: unpickled first
        super().__init__(*args, **kwargs)


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context for decoding workers (``DataLoader(multiprocessing_context=)``):
    ``spawn``, each worker dying with the process that started it."""
    return _WorkerContext()


__all__ = ["start_worker", "worker_context"]
