"""Named points where tests can kill the process, to prove that runs are crash-safe.

``MMR_FAILPOINTS="after_tokens=2"`` makes the 2nd pass through ``hit("after_tokens")`` SIGKILL
the process, exactly as a power cut or an OOM kill would. Unset (always, outside tests), ``hit``
is one dict lookup.

Points: ``batch_decoded``, ``after_tokens``, ``after_upsert`` (an index run's batch loop, see
:mod:`mm_retrieval.indexing`), ``mid_tokens`` (inside a token cache transaction) and
``decoding`` (a file about to be decoded, in a decoding worker process when there are workers:
it kills the index run, not the worker). Passes are counted per process.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("MMR_FAILPOINTS", "")
_armed = {k: int(v) for k, _, v in (p.partition("=") for p in _spec.split(",") if p)} if _spec else {}
_counts: dict[str, int] = {}


def hit(name: str, *, pid: int | None = None) -> None:
    """Count a pass through ``name``; SIGKILL ``pid`` (default: this process) if the environment
    armed it for this pass."""
    if not _armed or name not in _armed:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _armed[name]:
        os.kill(os.getpid() if pid is None else pid, signal.SIGKILL)
