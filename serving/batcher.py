"""Micro-batching for the service: concurrent requests become one model call.

Why its own module: the batching rules (a bounded queue, one worker, `max_batch`, `max_wait`)
are what keeps the service's memory bounded and its throughput near the bare model's, and they
are tested here without HTTP or a model. The worker runs the model in one dedicated thread, so
the event loop keeps accepting and rejecting requests while a batch runs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `queue_size` waiting items: the caller answers 503 (backpressure)."""


class ShuttingDown(Exception):
    """The batcher stopped before the item ran."""


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """A bounded queue drained by one worker into batches of at most `max_batch` items.

    `run(items)` is called in the worker thread with one batch and returns one result per item
    (or raises: every item of the batch then gets that exception). The worker starts a batch
    with the oldest waiting item and waits at most `max_wait_s` after that item's arrival for
    more; a backlog makes full batches without waiting.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
        pending: Callable[[], int] | None = None,
        pending_grace_s: float = 0.02,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1, max_wait_s >= 0")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch  # (batch size, seconds in run) after each batch
        # items on their way (e.g. being decoded): a batch waits up to pending_grace_s past
        # max_wait for them, so clients answered together are batched together again
        self.pending = pending
        self.pending_grace_s = pending_grace_s
        self._items: collections.deque[_Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.batches = 0
        self.in_flight = 0

    def depth(self) -> int:
        """Items waiting (not counting the batch being run)."""
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.queue_size

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="serve-model")
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="micro-batcher")

    def call_in_worker(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the model thread after what it runs now (e.g. closing a model)."""
        if self._executor is not None:
            self._executor.submit(fn, *args)
        else:
            fn(*args)

    async def submit(self, item: Any) -> Any:
        """Queue `item` and wait for its result; QueueFull at once if the queue is full."""
        if self._closed:
            raise ShuttingDown("the service is stopping")
        if self.full():
            raise QueueFull(f"queue full ({len(self._items)} waiting)")
        job = _Job(item, asyncio.get_running_loop().create_future())
        self._items.append(job)
        self._wakeup.set()
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._items.popleft()]
        deadline = batch[0].enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            if self._items:
                batch.append(self._items.popleft())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 and self.pending is not None and self.pending() > 0:
                remaining = deadline + self.pending_grace_s - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        # a client that went away (its handler cancelled) needs no answer
        return [j for j in batch if not j.future.done()]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.in_flight = len(batch)
            t0 = time.perf_counter()
            fut = loop.run_in_executor(self._executor, self.run, [j.item for j in batch])
            stopping = False
            try:
                try:
                    results = await asyncio.shield(fut)
                except asyncio.CancelledError:
                    # stop() while a batch runs: its thread finishes it, its callers get answers
                    stopping = True
                    results = await fut
                if len(results) != len(batch):
                    raise RuntimeError(f"run returned {len(results)} results for {len(batch)}")
            except Exception as exc:  # every caller of the batch gets the failure
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            else:
                for j, r in zip(batch, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(r)
            finally:
                self.in_flight = 0
                self.batches += 1
            if stopping:
                raise asyncio.CancelledError
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)

    async def stop(self) -> None:
        """Refuse new items, let the running batch finish, fail what still waits."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._items:
            job = self._items.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the service stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
