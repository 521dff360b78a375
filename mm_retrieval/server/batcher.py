"""Dynamic batching: requests that arrive together share one forward pass on the device.

The first job of a batch waits up to ``max_wait_s`` for others; the batch closes early when it
reaches ``max_jobs`` jobs or ``max_items`` items (documents). While the device runs one batch,
new jobs queue up and become the next one, so under load batches fill without waiting at all.
Every model call runs on one dedicated thread: models are not called concurrently (their forward
hooks and autocast state are not thread-safe), and the event loop never blocks on the device.

If a batch fails, its jobs are retried one by one, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


class QueueFull(Exception):
    """More jobs are waiting than the batcher accepts; the caller should retry later (429)."""


@dataclass
class BatchStats:
    """What the batcher has done, for /readyz and the benchmark."""

    batches: int = 0
    jobs: int = 0
    items: int = 0
    largest_batch: int = 0
    device_seconds: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)  # jobs per batch -> how many batches

    def record(self, jobs: int, items: int, seconds: float) -> None:
        self.batches += 1
        self.jobs += jobs
        self.items += items
        self.largest_batch = max(self.largest_batch, jobs)
        self.device_seconds += seconds
        self.sizes[jobs] = self.sizes.get(jobs, 0) + 1

    def to_dict(self) -> dict:
        mean = self.jobs / self.batches if self.batches else 0.0
        return {"batches": self.batches, "jobs": self.jobs, "items": self.items, "mean_batch": round(mean, 2),
                "largest_batch": self.largest_batch, "device_seconds": round(self.device_seconds, 3)}


class DynamicBatcher(Generic[J, R]):
    """Collects jobs submitted from the event loop and runs ``run_batch(jobs) -> results`` on the
    device thread. Start it inside the loop that will submit to it."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[J]], list[R]],
        *,
        size_of: Callable[[J], int] = lambda job: 1,
        max_jobs: int = 64,
        max_items: int = 4096,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        executor: ThreadPoolExecutor | None = None,
    ):
        self.run_batch = run_batch
        self.size_of = size_of
        self.max_jobs = max(1, max_jobs)
        self.max_items = max(1, max_items)
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmr-device")
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: tuple[J, asyncio.Future] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue(maxsize=self.max_queue)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="mmr-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, job: J) -> R:
        """Queue one job and wait for its result (its exception is re-raised here)."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((job, fut))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting for the device") from None
        return await fut

    # ---- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            await self._execute(batch)

    async def _collect(self) -> list[tuple[J, asyncio.Future]]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, items = [first], self.size_of(first[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_jobs and items < self.max_items:
            remaining = deadline - loop.time()
            try:
                nxt = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            size = self.size_of(nxt[0])
            if items + size > self.max_items:
                self._carry = nxt  # too big to join: it opens the next batch
                break
            batch.append(nxt)
            items += size
        return batch

    async def _execute(self, batch: list[tuple[J, asyncio.Future]]) -> None:
        live = [(job, fut) for job, fut in batch if not fut.done()]  # callers that gave up are skipped
        if not live:
            return
        loop = asyncio.get_running_loop()
        jobs = [job for job, _ in live]
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, jobs)
        except Exception as e:
            if len(live) == 1:
                _settle(live[0][1], error=e)
            else:
                log.info("a batch of %d failed (%s); retrying its jobs one by one", len(live), e)
                for job, fut in live:
                    try:
                        _settle(fut, result=(await loop.run_in_executor(self.executor, self.run_batch, [job]))[0])
                    except Exception as one:
                        _settle(fut, error=one)
        else:
            for (_, fut), res in zip(live, results):
                _settle(fut, result=res)
        self.stats.record(len(live), sum(self.size_of(j) for j in jobs), time.perf_counter() - t0)


def _settle(fut: asyncio.Future, *, result=None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
