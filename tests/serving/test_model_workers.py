"""ModelQueue with several workers (``serve --model-workers``, for a model on a model server)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from genrerank.serving.app import ModelQueue


def test_workers_run_calls_concurrently_and_bound_the_wait() -> None:
    async def scenario() -> None:
        queue = ModelQueue(4, max_wait_s=0.05, workers=2)
        both = threading.Barrier(2, timeout=5.0)
        release = threading.Event()

        def call(tag: str) -> str:
            both.wait()  # fails (BrokenBarrierError) unless two calls run at the same time
            release.wait(5.0)
            return tag

        first, second = queue.submit(lambda: call("a")), queue.submit(lambda: call("b"))
        assert first is not None and second is not None
        for _ in range(1000):  # up to 10 s: thread starts are slow on a loaded machine
            if queue.busy == 2:
                break
            await asyncio.sleep(0.01)
        assert queue.busy == 2 and queue.waiting == 0
        # Both workers busy at 40 ms a call: one waiting call would wait 20 ms, two 40 ms,
        # three 60 ms > 50 ms: the third waiting call is refused.
        queue.call_s = 0.04
        waiting = [queue.submit(lambda: "w") for _ in range(2)]
        assert all(w is not None for w in waiting)
        assert queue.expected_wait_s() == pytest.approx(0.06)
        assert queue.full() and queue.submit(lambda: "refused") is None
        release.set()
        assert {await first.future, await second.future} == {"a", "b"}
        assert [await w.future for w in waiting if w is not None] == ["w", "w"]
        # A worker answers the future before it counts itself free: give it a moment.
        for _ in range(1000):
            if queue.busy == 0:
                break
            await asyncio.sleep(0.01)
        assert queue.busy == 0
        queue.close()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="workers"):
        ModelQueue(2, workers=0)


def test_one_worker_keeps_the_single_worker_wait() -> None:
    queue = ModelQueue(8, workers=1)
    queue.call_s, queue.busy = 0.01, 1
    assert queue.expected_wait_s() == pytest.approx(0.01)  # the running call ahead
