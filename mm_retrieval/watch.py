"""``mmr watch FOLDER``: a collection that keeps itself in step with a folder.

File events (watchdog: inotify, FSEvents, ReadDirectoryChangesW) are collected until the folder
has been quiet for ``debounce`` seconds (a file still being copied keeps changing; at most
``max_delay`` seconds pass before a busy folder is synced anyway), then the folders they touched
are synced exactly as ``mmr sync`` does (:meth:`~mm_retrieval.pipeline.Pipeline.sync`): new files
added, changed ones replaced, moved ones kept with their vectors (a move's destination is synced
before its source), deleted ones removed. Each change is one line on stderr.

Crash safety is sync's: every run is ordered so that a kill at any moment leaves a consistent
collection, and ids derive from content, so nothing is lost or duplicated. Events that arrive
while the watcher is down are caught by the full sync it starts with, and a periodic full sync
(``full_every``) catches any an OS dropped (inotify's queue can overflow).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .errors import InputError, MMRError
from .types import IndexReport

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


@dataclass
class Change:
    """One file event, as printed: ``+`` created, ``~`` modified, ``>`` moved, ``-`` deleted."""

    kind: str
    path: str
    dest: str | None = None
    is_dir: bool = False

    def line(self) -> str:
        slash = os.sep if self.is_dir else ""
        return f"{self.kind} {self.path}{slash}" + (f" -> {self.dest}{slash}" if self.dest else "")


@dataclass
class _Pending:
    changes: dict[tuple[str, str], Change] = field(default_factory=dict)  # latest event per (path, dest)
    arrive: set[str] = field(default_factory=set)  # folders where files appeared or changed
    leave: set[str] = field(default_factory=set)  # folders files left
    first: float = 0.0
    last: float = 0.0


class FolderWatcher:
    """Watches ``folder`` and syncs ``pipeline``'s collection with it (see the module docstring).
    ``log``: where the per-change lines go (a callable taking one line); ``include_hidden``: also
    react to dot-files and dot-folders (as the folder source's option). ``release``: close the
    pipeline's store connection after each sync, so that other processes can use a Milvus Lite
    database between syncs (it admits one process at a time); the model stays loaded."""

    def __init__(self, pipeline: Any, folder: str | Path, *, debounce: float = 2.0, max_delay: float = 30.0,
                 full_every: float = 600.0, log: Callable[[str], None] = print, include_hidden: bool = False,
                 release: bool = False):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise InputError(f"not a folder: {root}; mmr watch keeps a collection in step with a folder of images and videos")
        if debounce < 0 or max_delay < debounce or full_every <= 0:
            raise InputError(f"watch timings: need 0 <= debounce <= max_delay and full_every > 0 "
                             f"(got debounce={debounce}, max_delay={max_delay}, full_every={full_every})")
        self.pipeline = pipeline
        self.root = root.resolve()
        self.debounce, self.max_delay, self.full_every = debounce, max_delay, full_every
        self.log = log
        self.include_hidden = include_hidden
        self.release = release
        self._pending = _Pending()
        self._cond = threading.Condition()
        self.syncs = 0  # sync runs done (tests and the bench wait on it)
        self.last_sync: float = 0.0

    # ---- events (watchdog's thread) --------------------------------------------------------
    def on_event(self, kind: str, path: str, dest: str | None = None, *, is_dir: bool = False) -> None:
        """Record one event (``created``, ``modified``, ``moved``, ``deleted``; paths absolute)."""
        if not (self._relevant(path, is_dir) or (dest is not None and self._relevant(dest, is_dir))):
            return
        if is_dir and kind == "modified":  # a folder's mtime: its files' own events say what changed
            return
        symbol = {"created": "+", "modified": "~", "moved": ">", "deleted": "-"}[kind]
        now = time.monotonic()
        with self._cond:
            p = self._pending
            if not p.changes:
                p.first = now
            p.last = now
            key = (path, dest or "")
            if kind == "modified" and (path, "") in p.changes:  # created, then written: still "+"
                symbol = p.changes[(path, "")].kind
            p.changes[key] = Change(symbol, path, dest, is_dir)
            here = path if is_dir else os.path.dirname(path)
            if kind in ("created", "modified"):
                p.arrive.add(here)
            elif kind == "deleted":
                p.leave.add(os.path.dirname(path) if is_dir else here)
            else:
                p.leave.add(os.path.dirname(path))
                p.arrive.add(dest if is_dir else os.path.dirname(dest))
            self._cond.notify_all()

    def _relevant(self, path: str, is_dir: bool) -> bool:
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return False
        if not self.include_hidden and any(part.startswith(".") for part in rel.parts):
            return False
        return is_dir or os.path.splitext(path)[1].lower() in MEDIA_EXTENSIONS

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Full sync, then watch until ``stop`` is set (or KeyboardInterrupt)."""
        from watchdog.observers import Observer

        stop = stop or threading.Event()
        observer = Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        try:
            observer.start()  # before the first sync: nothing that lands during it is missed
        except OSError as e:  # e.g. Linux's inotify watch limit, one watch per folder
            raise InputError(f"cannot watch {self.root}: {e.strerror or e} (on Linux, a folder tree larger than "
                             "fs.inotify.max_user_watches allows: raise it with sysctl, or run `mmr sync` on a schedule)") from e
        try:
            self.log(f"watching {self.root} (debounce {self.debounce:g}s, full sync every {self.full_every:g}s); Ctrl-C stops")
            self._full_sync("start")
            while not stop.is_set():
                batch = self._next_batch()
                if batch is not None:
                    self._sync_batch(batch)
                elif time.monotonic() - self.last_sync >= self.full_every:
                    self._full_sync("periodic")
        finally:
            observer.stop()
            observer.join(timeout=10)

    def _next_batch(self) -> _Pending | None:
        """The pending changes once the folder is quiet (or ``max_delay`` passed), else None
        after waiting a little."""
        with self._cond:
            p = self._pending
            now = time.monotonic()
            if p.changes and (now - p.last >= self.debounce or now - p.first >= self.max_delay):
                self._pending = _Pending()
                return p
            if p.changes:
                wait = min(self.debounce - (now - p.last), self.max_delay - (now - p.first))
            else:
                wait = self.full_every - (now - self.last_sync)
            self._cond.wait(timeout=max(0.01, min(wait, 0.5)))
        return None

    def _sync_batch(self, batch: _Pending) -> None:
        for c in sorted(batch.changes.values(), key=lambda c: c.path):
            self.log(c.line())
        # destinations first: a moved file is found at its new path (vector kept) before its old
        # path's folder is synced, which would otherwise remove it and encode it again
        done: list[Path] = []
        reports: list[IndexReport] = []
        for folder in [*_outermost(batch.arrive), *_outermost(batch.leave)]:
            scope = self._existing(Path(folder))
            if any(scope == d or d in scope.parents for d in done):
                continue
            report = self._sync(scope, batch)
            if report is None:
                return
            done.append(scope)
            reports.append(report)
        changed = {c.path for c in batch.changes.values()} | {c.dest for c in batch.changes.values() if c.dest}
        for r in reports:
            for f in r.failed:
                if f.path in changed:
                    self.log(f"! {f.path}: {f.error}")
        self.log("  " + _summary(reports))

    def _existing(self, folder: Path) -> Path:
        """``folder``, or its nearest existing ancestor inside the watched folder."""
        while folder != self.root and not folder.is_dir() and self.root in folder.parents:
            folder = folder.parent
        return folder if folder == self.root or self.root in folder.parents else self.root

    def _full_sync(self, why: str) -> None:
        report = self._sync(self.root, None)
        if report is not None:
            self.log(f"  full sync ({why}): " + _summary([report]) + f", unchanged {report.unchanged}")
            for f in report.failed[:20]:
                self.log(f"! {f.path}: {f.error}")
            if len(report.failed) > 20:
                self.log(f"! ... and {len(report.failed) - 20} more skipped files (mmr sync --json lists them)")

    def _sync(self, scope: Path, batch: _Pending | None) -> IndexReport | None:
        """``mmr sync`` of ``scope``; on a failure (another run holds the collection, the store is
        down) the batch goes back to pending and is retried."""
        try:
            report = self.pipeline.sync(scope, progress=False)
        except MMRError as e:
            self._release()
            self.log(f"! sync of {scope} failed, retried in {self.debounce:g}s or at the next change: {e}")
            if batch is not None:
                self._requeue(batch)
            self.last_sync = time.monotonic()
            return None
        self._release()
        self.syncs += 1
        self.last_sync = time.monotonic()
        return report

    def _release(self) -> None:
        if self.release:
            self.pipeline.close()

    def _requeue(self, batch: _Pending) -> None:
        with self._cond:
            p = self._pending
            p.changes = {**batch.changes, **p.changes}
            p.arrive |= batch.arrive
            p.leave |= batch.leave
            now = time.monotonic()
            p.first = p.first if p.changes and p.first else now
            p.last = now


def _outermost(folders: set[str]) -> list[str]:
    """``folders`` without those inside another of them (a sync is recursive)."""
    ordered = sorted({str(Path(f)) for f in folders}, key=len)
    kept: list[str] = []
    for f in ordered:
        if not any(f == k or f.startswith(k.rstrip(os.sep) + os.sep) for k in kept):
            kept.append(f)
    return kept


def _summary(reports: list[IndexReport]) -> str:
    total = {k: sum(getattr(r, k) for r in reports) for k in ("indexed", "replaced", "moved", "removed", "duplicates", "skipped")}
    return ", ".join(f"{k} {v}" for k, v in total.items())


class _Handler:
    """watchdog's callback interface, forwarding to :meth:`FolderWatcher.on_event`."""

    def __init__(self, watcher: FolderWatcher):
        self.watcher = watcher

    def dispatch(self, event: Any) -> None:
        kind = event.event_type
        if kind in ("closed", "opened", "closed_no_write"):
            if kind == "closed":  # a file finished being written: counts as a change
                self.watcher.on_event("modified", os.fsdecode(event.src_path), is_dir=event.is_directory)
            return
        if kind not in ("created", "modified", "moved", "deleted"):
            return
        dest = os.fsdecode(event.dest_path) if kind == "moved" else None
        self.watcher.on_event(kind, os.fsdecode(event.src_path), dest, is_dir=event.is_directory)
