"""The batcher alone, with a fake engine that records every batch it is given."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from optimodel.batching import BatchingConfig
from serving_image.batcher import Batcher, BatcherClosed, EngineError, Overloaded, QueueFull


class FakeEngine:
    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, feeds):
        self.gate.wait(5)
        x = feeds["x"]
        self.batches.append(len(x))
        if self.fail_on is not None and len(x) == self.fail_on:
            raise RuntimeError("boom")
        if self.delay:
            time.sleep(self.delay)
        return {"y": x * 2}


def cfg(wait_ms: float, max_bs: int, max_queue: int = 1024) -> BatchingConfig:
    return BatchingConfig(max_wait_ms=wait_ms, max_batch_size=max_bs, max_queue=max_queue)


def req(n: int, value: float = 0.0, width: int = 3) -> dict:
    return {"x": np.full((n, width), value, np.float32)}


async def started(engine, config, engine_max: int = 64) -> Batcher:
    b = Batcher(engine, config, engine_max_batch=engine_max)
    await b.start()
    return b


async def test_full_batch_goes_at_once():
    engine = FakeEngine()
    b = await started(engine, cfg(1000, 4))
    t0 = time.monotonic()
    outs = await asyncio.gather(*(b.submit(req(1, i), 1) for i in range(4)))
    assert time.monotonic() - t0 < 0.5, "a full batch must not wait for maxWaitMs"
    assert engine.batches == [4]
    assert [o["y"][0, 0] for o in outs] == [0, 2, 4, 6]
    await b.close()


async def test_partial_batch_waits_for_oldest_request():
    engine = FakeEngine()
    b = await started(engine, cfg(150, 8))
    t0 = time.monotonic()
    first = b.submit(req(1), 1)
    await asyncio.sleep(0.05)
    second = b.submit(req(2), 2)
    await asyncio.gather(first, second)
    waited = time.monotonic() - t0
    assert 0.14 <= waited < 0.6, waited  # timed from the oldest request, not the newest
    assert engine.batches == [3]
    await b.close()


async def test_zero_wait_never_waits():
    engine = FakeEngine()
    b = await started(engine, cfg(0, 8))
    t0 = time.monotonic()
    await b.submit(req(1), 1)
    assert time.monotonic() - t0 < 0.1
    assert engine.batches == [1]
    await b.close()


async def test_mixed_sizes_are_packed_and_split_back():
    engine = FakeEngine()
    b = await started(engine, cfg(50, 16))
    sizes = [3, 1, 2, 5]
    futs = [b.submit(req(n, i + 1), n) for i, n in enumerate(sizes)]
    outs = await asyncio.gather(*futs)
    assert engine.batches == [11]
    for i, (n, out) in enumerate(zip(sizes, outs)):
        assert out["y"].shape == (n, 3)
        assert np.all(out["y"] == 2 * (i + 1))
    await b.close()


async def test_batch_never_exceeds_max_batch_size():
    engine = FakeEngine()
    b = await started(engine, cfg(20, 6))
    await asyncio.gather(*(b.submit(req(n), n) for n in (4, 3, 3, 2, 1)))
    assert engine.batches == [4, 6, 3]  # FIFO: 4 alone (3 does not fit), then 3+3, then 2+1
    await b.close()


async def test_requests_with_other_feature_shapes_are_not_packed():
    engine = FakeEngine()
    b = await started(engine, cfg(20, 16))
    a, c, d = b.submit(req(1, width=3), 1), b.submit(req(1, width=5), 1), b.submit(req(1, width=5), 1)
    outs = await asyncio.gather(a, c, d)
    assert engine.batches == [1, 2]
    assert [o["y"].shape for o in outs] == [(1, 3), (1, 5), (1, 5)]
    await b.close()


async def test_next_batch_forms_while_engine_runs():
    engine = FakeEngine(delay=0.15)
    b = await started(engine, cfg(0, 8))
    first = b.submit(req(1), 1)
    await asyncio.sleep(0.03)  # the engine is busy with the first request now
    rest = [b.submit(req(1), 1) for _ in range(5)]
    await asyncio.gather(first, *rest)
    assert engine.batches == [1, 5], "requests arriving during a run must share the next call"
    await b.close()


async def test_full_batch_is_staged_behind_running_one():
    engine = FakeEngine(delay=0.1)
    b = await started(engine, cfg(0, 2))
    futs = [b.submit(req(1), 1) for _ in range(6)]
    await asyncio.sleep(0.02)
    assert b._running == 2, "a full batch should be queued behind the running one"
    await asyncio.gather(*futs)
    assert engine.batches == [2, 2, 2]
    await b.close()


async def test_queue_bound_rejects_at_once():
    engine = FakeEngine()
    engine.gate.clear()  # the engine hangs until released
    b = await started(engine, cfg(0, 1, max_queue=2))
    running = b.submit(req(1), 1)
    await asyncio.sleep(0.02)
    staged = b.submit(req(1), 1)  # staged in the engine thread's queue
    await asyncio.sleep(0.02)
    queued = [b.submit(req(1), 1), b.submit(req(1), 1)]
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match="queue full"):
        b.submit(req(1), 1)
    assert time.monotonic() - t0 < 0.01
    engine.gate.set()
    await asyncio.gather(running, staged, *queued)
    await b.close()


async def test_config_change_applies_to_next_batch_and_keeps_queued_requests():
    engine = FakeEngine(delay=0.05)
    b = await started(engine, cfg(0, 8))
    first = b.submit(req(1), 1)
    await asyncio.sleep(0.01)
    big = b.submit(req(6), 6)  # queued while the engine runs
    b.update_config(cfg(0, 2))  # smaller than the queued request
    small = [b.submit(req(1), 1) for _ in range(4)]
    await asyncio.gather(first, big, *small)
    assert engine.batches == [1, 6, 2, 2], "the 6 runs alone, then batches of the new maximum"
    assert b.update_config(cfg(5, 1000)).max_batch_size == 64, "clamped to the engine's limit"
    await b.close()


async def test_engine_error_fails_only_its_batch():
    engine = FakeEngine(fail_on=3)
    b = await started(engine, cfg(20, 3))
    bad = [b.submit(req(1), 1) for _ in range(3)]
    results = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(r, EngineError) and "boom" in str(r) for r in results)
    ok = await b.submit(req(2), 2)
    assert ok["y"].shape == (2, 3)
    await b.close()


async def test_close_answers_everything_queued_then_refuses():
    engine = FakeEngine(delay=0.02)
    b = await started(engine, cfg(500, 2))
    futs = [b.submit(req(1), 1) for _ in range(5)]
    await b.close()
    assert all(f.done() and not f.exception() for f in futs)
    assert sum(engine.batches) == 5
    with pytest.raises(BatcherClosed):
        b.submit(req(1), 1)


async def test_admission_counts_the_requests_own_batch_its_time_spent_and_the_tail():
    """Deadline = arrival to answer: with 2 batches ahead at 20 ms (+ deviation), its own batch makes it late."""
    engine = FakeEngine()
    engine.gate.clear()  # the engine holds its first batch: what is queued stays queued
    b = await started(engine, cfg(0, 4))
    b.batch_seconds, b.batch_deviation = 0.020, 0.0
    b.admit(0.001)  # nothing running, nothing queued: always admitted, whatever the estimate
    running = b.submit(req(4), 4)
    await asyncio.sleep(0.05)  # dispatched to the (gated) engine
    queued = b.submit(req(4), 4, deadline=1.0)
    # 2 batches ahead (running + queued) and its own: 60 ms
    b.admit(0.061)
    with pytest.raises(Overloaded):
        b.admit(0.059)
    # time already spent before admission counts
    with pytest.raises(Overloaded):
        b.admit(0.061, since=time.monotonic() - 0.005)
    # the tail, not the mean: a deviation of 5 ms per batch adds 10 ms to each of the 3
    b.batch_deviation = 0.005
    with pytest.raises(Overloaded):
        b.admit(0.075)
    b.admit(0.091)
    engine.gate.set()
    await asyncio.gather(running, queued)
    await b.close()


async def test_queued_request_that_can_no_longer_finish_in_time_is_failed_not_run():
    engine = FakeEngine(delay=0.1)
    b = Batcher(engine, cfg(0, 1), engine_max_batch=64, max_staged=0)  # no staging: it waits in the queue
    await b.start()
    b.batch_seconds = 0.01  # the estimate at admission: 2 batches of 10 ms fit in 60 ms
    first = b.submit(req(1), 1)  # really runs 100 ms
    late = b.submit(req(1), 1, deadline=0.06)  # admitted; must start within 50 ms to end by 60 ms
    await first
    with pytest.raises(Overloaded):
        await late
    assert engine.batches == [1], "the late request must not reach the engine"
    await b.close()


async def test_staged_request_past_its_latest_start_is_failed_not_run():
    """A full batch staged behind a running one starts only when that ends: too late is not run."""
    engine = FakeEngine(delay=0.1)
    b = await started(engine, cfg(0, 1))  # maxBatchSize 1: every request is a full batch, staged at once
    b.batch_seconds = 0.01
    first = b.submit(req(1), 1)  # really runs 100 ms
    await asyncio.sleep(0.01)  # dispatched
    staged = b.submit(req(1), 1, deadline=0.06)  # staged behind it; must start within 50 ms
    await first
    with pytest.raises(Overloaded):
        await staged
    assert engine.batches == [1], "the late request must not reach the engine"
    assert (await b.submit(req(1), 1, deadline=5.0))["y"].shape == (1, 3)  # and the batcher keeps serving
    await b.close()
