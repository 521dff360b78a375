"""tests/unit: the pure parts, in seconds (the inner loop: `pytest tests/unit`)."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Each unit test runs torch on one thread. Their tensors are tiny, so a second thread gains
    nothing, and on a busy machine OpenMP threads spin waiting for a core another process holds:
    under load, a small training test took 4x the CPU time and 4x the wall time with two threads.
    Only where torch is imported already (importing it here would slow the tests that don't use it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
