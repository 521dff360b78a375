"""Named points where tests can kill the process, to prove that runs are crash-safe.

``MMR_FAILPOINTS="after_tokens=2"`` makes the 2nd pass through ``hit("after_tokens")`` SIGKILL
the process, exactly as a power cut or an OOM kill would. Unset (always, outside tests), ``hit``
is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("MMR_FAILPOINTS", "")
_armed = {k: int(v) for k, _, v in (p.partition("=") for p in _spec.split(",") if p)} if _spec else {}
_counts: dict[str, int] = {}


def hit(name: str) -> None:
    """Count a pass through ``name``; die here if the environment armed it for this pass."""
    if not _armed or name not in _armed:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _armed[name]:
        os.kill(os.getpid(), signal.SIGKILL)
