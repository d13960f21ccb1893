"""The micro-batcher without HTTP or a model: batches form as the rules say, the queue is
bounded, failures reach every caller of a batch, stop() answers what waits."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fedclip_edge.serving.batcher import MicroBatcher, QueueFull, ShuttingDown


class Gate:
    """Holds the worker thread inside `run` until released; says when it is held."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[int]] = []

    def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(10), "the test never released the worker"
        return [2 * i for i in items]


async def _wait_for(pred, what: str) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_backlog_makes_full_batches_in_arrival_order() -> None:
    async def main() -> None:
        gate = Gate()
        b = MicroBatcher(gate.run, max_batch=3, max_wait_s=0, queue_size=10)
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 8)]
        await _wait_for(lambda: b.depth() == 7, "7 waiting")
        gate.release.set()
        assert await asyncio.gather(first, *rest) == [2 * i for i in range(8)]
        # the worker was held on [0]; the 7 that waited ran as 3 + 3 + 1, in order
        assert gate.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
        await b.stop()

    asyncio.run(main())


def test_max_wait_gathers_items_that_arrive_within_it() -> None:
    async def main() -> None:
        seen: list[list[int]] = []
        b = MicroBatcher(lambda xs: seen.append(xs) or xs, max_batch=8, max_wait_s=5.0,
                         queue_size=10)
        await b.start()
        # the first item waits up to 5 s for company; 8 items fill the batch long before
        out = await asyncio.gather(*(b.submit(i) for i in range(8)))
        assert out == list(range(8)) and seen == [list(range(8))]
        await b.stop()

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_recovers() -> None:
    async def main() -> None:
        gate = Gate()
        b = MicroBatcher(gate.run, max_batch=1, max_wait_s=0, queue_size=2)
        await b.start()
        held = asyncio.ensure_future(b.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await _wait_for(lambda: b.depth() == 2, "a full queue")
        assert b.full()
        with pytest.raises(QueueFull, match="queue full"):
            await b.submit(4)
        gate.release.set()
        assert await asyncio.gather(held, *waiting) == [2, 4, 6]
        assert await b.submit(5) == 10  # room again
        await b.stop()

    asyncio.run(main())


def test_a_failed_batch_fails_each_of_its_callers_and_the_worker_goes_on() -> None:
    async def main() -> None:
        calls = []

        def run(xs: list[int]) -> list[int]:
            calls.append(xs)
            if len(calls) == 1:
                raise RuntimeError("model exploded")
            return xs

        b = MicroBatcher(run, max_batch=4, max_wait_s=0.5, queue_size=10)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await b.submit(9) == 9
        await b.stop()

    asyncio.run(main())


def test_a_run_that_returns_the_wrong_count_is_an_error_not_a_hang() -> None:
    async def main() -> None:
        b = MicroBatcher(lambda xs: xs[:1], max_batch=4, max_wait_s=0.5, queue_size=10)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(2)), return_exceptions=True)
        assert all("2" in str(r) for r in results), results
        await b.stop()

    asyncio.run(main())


def test_stop_finishes_the_running_batch_and_fails_what_waits() -> None:
    async def main() -> None:
        gate = Gate()
        b = MicroBatcher(gate.run, max_batch=1, max_wait_s=0, queue_size=5)
        await b.start()
        running = asyncio.ensure_future(b.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
        waiting = asyncio.ensure_future(b.submit(2))
        await _wait_for(lambda: b.depth() == 1, "one waiting")
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0)  # stop() has begun: it cancels the worker inside the batch
        gate.release.set()
        await stopping
        assert await running == 2  # the batch in its thread finished and was answered
        with pytest.raises(ShuttingDown):
            await waiting
        with pytest.raises(ShuttingDown):
            await b.submit(3)

    asyncio.run(main())


def test_bad_settings_are_refused() -> None:
    for kw in ({"max_batch": 0}, {"queue_size": 0}, {"max_wait_s": -1}):
        with pytest.raises(ValueError):
            MicroBatcher(lambda xs: xs, **kw)


def test_a_batch_waits_past_max_wait_for_items_on_their_way_and_only_for_them() -> None:
    async def main() -> None:
        seen: list[list[int]] = []
        on_the_way = [1]
        b = MicroBatcher(lambda xs: seen.append(list(xs)) or xs, max_batch=8, max_wait_s=0,
                         queue_size=10, pending=lambda: on_the_way[0], pending_grace_s=30)
        await b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)  # far past max_wait (0): the worker holds 1, as 2 is coming
        assert seen == []
        on_the_way[0] = 0
        second = await b.submit(2)
        assert (await first, second) == (1, 2) and seen == [[1, 2]]
        # nothing on its way: no waiting at all past max_wait
        assert await b.submit(3) == 3 and seen[-1] == [3]
        await b.stop()

    asyncio.run(main())
