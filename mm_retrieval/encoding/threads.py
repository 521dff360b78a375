"""How many processes decode and how many threads encode while an index run encodes files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StageError
from ..stages.base import Encoder


def decode_workers(encoder: Encoder, n_files: int) -> int:
    """How many worker processes :func:`~mm_retrieval.encoding.encode_files` decodes ``n_files``
    with: the encoder's ``workers``, or none when the files fit in one batch (workers could not
    overlap them with anything)."""
    return encoder.workers if n_files > encoder.batch_size else 0


def indexing_threads(encoder: Encoder, workers: int | None = None) -> int:
    """The torch thread count a (warm) encoder encodes files with: on a CPU, one thread fewer per
    decoding worker (at least one), since torch's intra-op threads and the workers otherwise compete
    for the same cores and an OpenMP thread that loses its core stalls the others at every barrier
    (measured 1.2x indexing throughput on 2 cores with 2 workers); the encoder's ``index_threads``
    (when > 0) instead. Elsewhere torch's current count. ``workers``: the workers actually started
    (default: the encoder's)."""
    import torch

    current = torch.get_num_threads()
    if str(encoder.device) != "cpu":
        return current
    if encoder.index_threads > 0:
        return encoder.index_threads
    return max(1, current - (encoder.workers if workers is None else workers))


@contextmanager
def cpu_threads(encoder: Encoder, workers: int) -> Iterator[None]:
    """Torch on :func:`indexing_threads` threads; the setting is process-wide, so it is restored
    as soon as the loop ends or is abandoned."""
    import torch

    before, wanted = torch.get_num_threads(), indexing_threads(encoder, workers)
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def workers_died(encoder: Encoder, e: BaseException) -> StageError:
    """The error of a run whose decoding workers (or their fork server) died, saying what to do."""
    from ..workers import server_died

    server = server_died()
    if server is not None and server[1]:  # killed (e.g. by the OOM killer): nothing to fix but to run again
        return StageError(encoder.label, f"{server[0]} ({type(e).__name__}: {e}). Batches already written are kept: "
                                         "run again to do the rest (a new fork server is started)")
    return StageError(
        encoder.label,
        f"{server[0] if server else 'a decoding worker process died'} ({type(e).__name__}: {e}). If this runs from a "
        "script, guard its entry point with `if __name__ == \"__main__\":` (workers start as with spawn), or set the "
        "encoder's workers to 0",
    )
