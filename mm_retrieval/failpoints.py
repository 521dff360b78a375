"""Named points where tests can kill the process, to prove that runs are crash-safe.

``MMR_FAILPOINTS="after_tokens=2"`` makes the 2nd pass through ``hit("after_tokens")`` SIGKILL
the process, exactly as a power cut or an OOM kill would; ``after_upsert=2:INT`` sends SIGINT
instead (Ctrl-C: the run stops itself and says what landed). Unset (always, outside tests), ``hit``
is one dict lookup.

Points: ``batch_decoded``, ``after_tokens``, ``after_upsert`` (an index run's batch loop, see
:mod:`mm_retrieval.indexing`; the last two also between a video's tokens and its segments' one
write), ``video_decoded`` (a video's frames encoded, nothing of it written yet), ``mid_tokens``
(inside a token cache write, half its slots written), ``mid_slot`` (half of one slot's bytes
written, :mod:`mm_retrieval.tokencache.slots`) and
``decoding`` (a file about to be decoded, in a decoding worker process when there are workers:
it kills the index run, not the worker), ``fork_server`` (the same moment, in a worker forked from
the decoding workers' fork server: it kills that server, :mod:`mm_retrieval.workers`), ``ray_actor_batch`` (a Ray encoder actor about to encode
a batch, :mod:`mm_retrieval.distributed.actors`: it kills that actor; the driver forwards
``MMR_FAILPOINTS`` to the actors). Passes are counted per process.

``MMR_FAILPOINT_ONCE_DIR=DIR`` makes each point kill once in all: the first kill leaves a marker
file ``DIR/<point>``, and later passes (e.g. in the actor Ray restarts) only count.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[int, int]]:
    """``name=N`` or ``name=N:SIG`` (a signal name without SIG, e.g. INT) -> {name: (N, signal)}."""
    out = {}
    for name, _, value in (p.partition("=") for p in spec.split(",") if p):
        n, _, sig = value.partition(":")
        out[name] = (int(n), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
    return out


_armed = _parse(os.environ.get("MMR_FAILPOINTS", ""))


def rearm() -> None:
    """Read ``MMR_FAILPOINTS`` again (a process whose environment was set after it started, such
    as a Ray actor given the driver's: :mod:`mm_retrieval.distributed.actors`)."""
    global _armed
    _armed = _parse(os.environ.get("MMR_FAILPOINTS", ""))


def hit(name: str, *, pid: int | None = None) -> None:
    """Count a pass through ``name``; SIGKILL ``pid`` (default: this process) if the environment
    armed it for this pass."""
    if not _armed or name not in _armed:
        return
    _counts[name] = _counts.get(name, 0) + 1
    n, sig = _armed[name]
    if _counts[name] == n and _first_kill(name):
        os.kill(os.getpid() if pid is None else pid, sig)


def _first_kill(name: str) -> bool:
    """False when MMR_FAILPOINT_ONCE_DIR holds ``name``'s marker already (else it is created)."""
    once = os.environ.get("MMR_FAILPOINT_ONCE_DIR")
    if not once:
        return True
    try:
        os.close(os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
