"""Joining (or starting) a Ray instance for an index run, quietly and with bounded waits.

``address``: ``None``/``""``/``"local"`` starts a local instance on this machine's cores (shut
down again when the run ends); ``"auto"`` joins the cluster this machine belongs to (``ray
start`` ran here, or ``RAY_ADDRESS``); ``"ray://host:port"`` joins one through the Ray Client
port; ``"host:port"`` joins one by its head's GCS address. An address that answers nothing is an
:class:`~mm_retrieval.errors.InputError` (exit code 2) before anything is written.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

#: Seconds a ``host:port`` address may take to accept a TCP connection.
PROBE_TIMEOUT_S = 5.0
LOCAL = ("", "local")


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or MissingDependencyError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow/pandas glue)
    except ImportError as e:
        raise MissingDependencyError("ray[data]", "ray", "mmr index --ray") from e
    return ray


@dataclass
class RayCluster:
    """A connection to Ray for one index run; :meth:`close` shuts down what :func:`connect` started."""

    address: str  # as given ("local" for a local instance)
    started: bool  # this process started (or joined) Ray and shuts it down on close
    resources: dict[str, float] = field(default_factory=dict)  # the cluster's totals (CPU, GPU, memory)
    max_node_cpus: float = 0.0  # CPUs of the largest node (an actor can't span nodes)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def cpus(self) -> int:
        return int(self.resources.get("CPU", 0))

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def connect(address: str | None) -> RayCluster:
    """Start or join Ray (see the module docstring). Reuses a Ray this process already started
    (e.g. ``ray.init()`` in a notebook or a test), leaving it running afterwards."""
    ray = require_ray()
    quiet_ray()
    given = "local" if address is None or address.strip() in LOCAL else address.strip()
    if ray.is_initialized():
        return _describe(ray, RayCluster(given, started=False))
    if given != "local" and given != "auto":
        probe(given)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if given == "local":
        kwargs.update(address="local", num_cpus=os.cpu_count() or 1)
    else:
        kwargs["address"] = given
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot join the Ray cluster at --ray {given}: {_short(e)}. " + _HOW) from e
    return _describe(ray, RayCluster(given, started=True))


_HOW = ("Give 'auto' on a node of a running cluster (`ray start --head` on the head), ray://HOST:10001 (the head's "
        "Ray Client port) or HOST:6379 (its GCS address), or --ray alone for a local Ray instance")


def probe(address: str) -> None:
    """Check that ``address``'s host:port accepts a TCP connection within PROBE_TIMEOUT_S
    (ray.init itself would wait much longer on a wrong address)."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    hostport = hostport.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(f"--ray {address}: expected 'auto', ray://HOST:PORT or HOST:PORT. " + _HOW)
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise InputError(f"cannot reach the Ray cluster at --ray {address}: {host}:{port} {reason}; nothing was written. "
                         "Is the Ray head running and the port open? " + _HOW) from e


def quiet_ray() -> None:
    """Ray Data's own progress bars and per-run log lines off (mmr's bar on stderr stays
    readable); ``mmr -v`` shows Ray's INFO logs again."""
    verbose = logging.getLogger("mm_retrieval").getEffectiveLevel() <= logging.INFO
    # Ray Data logs a failed actor's traceback before raising it: the run re-raises it as one
    # StageError line, so the log is only wanted with -v
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _describe(ray: Any, cluster: RayCluster) -> RayCluster:
    cluster.resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    cluster.max_node_cpus = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    return cluster


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()).rstrip(".")
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)
