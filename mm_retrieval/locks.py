"""Write locks the OS releases when their holder dies, and which processes hold a file open.

A collection takes one index run at a time: :class:`CollectionLock` is an ``flock`` on a file next
to the collection's token caches. ``flock`` locks belong to the open file, so a process that
inherited the descriptor (a forked child outliving its parent) keeps the lock; when someone other
than the mmr run that wrote its pid into the file holds it, the refusal names that process
(:func:`holders`), so the user knows what to stop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import InputError

LOCK_FILE = "write.lock"


class CollectionLock:
    """An exclusive, non-blocking write lock on a collection (``flock``: released by the OS when
    the holder dies). A second writer gets :class:`InputError` at once, naming the holder."""

    def __init__(self, directory: Path, collection: str):
        self.path = Path(directory) / LOCK_FILE
        self.collection = collection
        self._fd: int | None = None

    def __enter__(self) -> "CollectionLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            recorded = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise InputError(self._held_message(recorded)) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"mmr pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _held_message(self, recorded: str) -> str:
        """Who holds the lock: the mmr run recorded in the file when it is alive and among the
        processes holding the file; otherwise the processes that do (named by pid)."""
        m = re.match(r"mmr pid (\d+)", recorded)
        run = int(m.group(1)) if m else None
        others = holders(self.path)
        if run is not None and _alive(run) and (run in others or not others):
            return (f"collection {self.collection!r} is being written by {recorded}; wait for that run to finish "
                    "(a killed run releases the lock by itself) and run this again")
        if others:
            who = ", ".join(describe_process(p) for p in others[:3])
            left = f"; the lock was taken by mmr pid {run}, which has exited" if run is not None and not _alive(run) else ""
            return (f"collection {self.collection!r} is locked by {who}, which is not an mmr index run but holds "
                    f"{self.path} open{left}. Stop that process (kill {others[0]}) and run this again")
        return (f"collection {self.collection!r} is being written by {recorded or 'another process'} (it holds "
                f"{self.path}); wait for that run to finish (a killed run releases the lock by itself) and run this again")


def holders(path: str | Path) -> list[int]:
    """Pids of the processes, other than this one, that hold ``path`` open (from ``/proc``; only
    processes this user may inspect; empty where there is no ``/proc``)."""
    target = os.path.realpath(path)
    me, found = os.getpid(), []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to inspect
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    found.append(pid)
                    break
            except OSError:
                continue
    return sorted(found)


def describe_process(pid: int) -> str:
    """``pid 123 (python -m something ...)``: the pid and, where readable, its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


__all__ = ["CollectionLock", "LOCK_FILE", "describe_process", "holders"]
