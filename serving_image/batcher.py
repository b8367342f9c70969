"""The dynamic batcher: one class, one queue, one loop (Triton's semantics).

- A batch goes to the engine as soon as it holds maxBatchSize samples; otherwise
  when its oldest request has waited maxWaitMs; maxWaitMs 0 never waits.
- Requests of different batch sizes are packed into one engine call and split back.
  Requests whose non-batch dimensions differ cannot share a call; the batch closes
  at the first such request and FIFO order is kept.
- The engine runs in one worker thread. While it runs, the next batch keeps
  growing; a full batch is staged behind the running one so a saturated engine
  never idles for an event-loop turn. There is exactly one thread hop per batch,
  none per request: concatenation, the engine call and the split all happen in
  the worker, and the loop sets every request's future from one callback.
- The queue is bounded (maxQueue requests): past it, submit() raises QueueFull at
  once so the caller can answer 503 instead of growing memory.
- Admission is also by time: with a deadline (the time a request may take from its
  arrival to its answer: the p99 SLO), a request whose estimated finish (time it has
  already spent, plus the batches ahead of it and its own, each at a tail estimate of
  the batch time measured under the current load) lies past the deadline raises
  Overloaded at once, and a queued request that can no longer finish in time (its
  latest start passed) is failed with Overloaded rather than run late. A length bound
  alone let the queue hold seconds of work at 10x load: every answer came too late to
  count. Estimating only the start (not the request's own batch) with the mean batch
  time admitted requests that then missed: engine-bound at 10x, answered p99 was 1.7x
  the SLO.
- A config change applies to the next batch formed; queued requests are kept even
  when maxBatchSize shrinks below their size (such a request runs alone).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from optimodel.batching import BatchingConfig

log = logging.getLogger("serving_image")

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class QueueFull(Exception):
    pass


class BatcherClosed(Exception):
    pass


class EngineError(Exception):
    pass


class Overloaded(Exception):
    """The request cannot start within its deadline; retry_after is a hint in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class _Item:
    __slots__ = ("inputs", "n", "key", "future", "enqueued", "start_by")

    def __init__(self, inputs, n, key, future, enqueued, start_by):
        self.inputs = inputs
        self.n = n
        self.key = key
        self.future = future
        self.enqueued = enqueued
        self.start_by = start_by


class Batcher:
    def __init__(self, run: RunFn, config: BatchingConfig, engine_max_batch: int, metrics=None,
                 max_staged: int = 1):
        self._run_fn = run
        self.engine_max_batch = engine_max_batch
        self._metrics = metrics
        self._queue: deque[_Item] = deque()
        # one engine thread fed by a SimpleQueue, not a ThreadPoolExecutor: the executor's submit (a
        # concurrent Future with its condition, a work item, an idle semaphore) was 1.4 % of the event
        # loop's samples at 2,000 req/s; a put here is one C lock release
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._running = 0  # batches handed to the engine thread and not completed
        self._max_in_engine = 1 + max_staged
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._idle: asyncio.Event | None = None
        self.batches = 0
        self._queued_samples = 0
        # recent engine time of one batch (EWMA) and its mean absolute deviation (EWMA), for
        # admission by time; 0 until known
        self.batch_seconds = 0.0
        self.batch_deviation = 0.0
        # how late the event loop runs a batch's completion (EWMA): a loop busy refusing thousands
        # of requests a second answers late, and reads the next request late, by about as much
        self.loop_lag = 0.0
        self.config = self._clamp(config)

    # ---- configuration -------------------------------------------------------------

    def _clamp(self, config: BatchingConfig) -> BatchingConfig:
        if config.max_batch_size > self.engine_max_batch:
            log.warning("maxBatchSize %d exceeds the engine's limit %d; using %d",
                        config.max_batch_size, self.engine_max_batch, self.engine_max_batch)
            config = config.model_copy(update={"max_batch_size": self.engine_max_batch})
        if self._metrics is not None:
            self._metrics.max_wait_ms.set(config.max_wait_ms)
            self._metrics.max_batch_size.set(config.max_batch_size)
        return config

    def update_config(self, config: BatchingConfig) -> BatchingConfig:
        self.config = self._clamp(config)
        self._wake()
        return self.config

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._engine_thread, name="engine_0", daemon=True)
        self._thread.start()
        self._task = asyncio.create_task(self._loop_forever(), name="batcher")

    async def close(self) -> None:
        """Run every queued request, wait for the engine, then stop (nothing is dropped)."""
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task
        if self._idle is not None:
            await self._idle.wait()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _engine_thread(self) -> None:
        """Run jobs (fn, args, done) in order; done(result, exception) is called in this thread."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, done = job
            try:
                result, exc = fn(*args), None
            except BaseException as err:  # handed to the loop, which fails the batch's requests
                result, exc = None, err
            try:
                done(result, exc)
            except RuntimeError as err:  # the loop closed under us (a test tearing down): nobody waits
                log.warning("engine result dropped: %s", err)
            del job, fn, args, done, result, exc

    async def run_in_engine(self, fn, *args):
        """Run fn in the engine thread (warm-up: CUDA/TensorRT state then lives where it is used)."""
        loop = self._loop
        fut = loop.create_future()

        def settle(result, exc):
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

        self._jobs.put((fn, args, lambda result, exc: loop.call_soon_threadsafe(settle, result, exc)))
        return await fut

    # ---- requests ------------------------------------------------------------------

    def estimated_finish(self, n: int = 1) -> float:
        """Seconds until a request of n samples queued now would be answered (0 while unknown)."""
        max_bs = self.config.max_batch_size
        batches = self._running + -(-(self._queued_samples + n) // max_bs)
        return batches * self.batch_seconds

    @property
    def batch_tail_seconds(self) -> float:
        """A batch time few batches exceed (mean + 2 mean deviations): admission must hold for the tail,
        not the average, since the SLO is a p99."""
        return self.batch_seconds + 2.0 * self.batch_deviation

    def admit(self, deadline: float | None, n: int = 1, since: float | None = None) -> int:
        """Raise Overloaded when a request of n samples, arrived at `since` (monotonic; now when None),
        could not be answered within deadline seconds of its arrival.

        A request that finds nothing running and nothing queued is always admitted: a refused
        request runs no batch, so when one slow batch (a starved CPU) pushed the estimate past
        the deadline, refusing even those would refuse every request for good.
        Cheap enough to call before reading a body, so refusals cost no parsing.
        Returns the number of batches ahead of it.
        """
        ahead = self._batches_ahead(n)
        if deadline is not None and self.batch_seconds > 0:
            if ahead:
                spent = 0.0 if since is None else time.monotonic() - since
                finish = spent + (ahead + 1) * self.batch_tail_seconds + 2.0 * self.loop_lag
                if finish > deadline:
                    raise Overloaded(f"overloaded: a request now would be answered in about {finish * 1000:.0f} ms, "
                                     f"past its deadline of {deadline * 1000:.0f} ms", retry_after=finish - deadline)
        return ahead

    def _batches_ahead(self, n: int) -> int:
        """Batches that run before the one a request of n samples queued now would join."""
        return self._running + (self._queued_samples + n - 1) // self.config.max_batch_size

    def submit(self, inputs: dict[str, np.ndarray], n: int, deadline: float | None = None,
               since: float | None = None) -> asyncio.Future:
        """Queue one validated request of n samples; its future resolves to its outputs.

        deadline: seconds from its arrival (`since`, monotonic; now when None) within which the request
        must be answered (None: no limit).
        """
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if len(self._queue) >= self.config.max_queue:
            raise QueueFull(f"queue full ({self.config.max_queue} requests waiting)")
        ahead = self.admit(deadline, n, since)
        fut = self._loop.create_future()
        key = tuple(a.shape[1:] for a in inputs.values()) if len(inputs) > 1 else next(iter(inputs.values())).shape[1:]
        now = time.monotonic()
        if deadline is None or not ahead:
            # nothing ahead of it: it starts at the end of its window whatever it already spent (a loop
            # slow to parse a burst must not make every request expire, leaving the engine idle)
            start_by = None
        else:
            # the latest start from which its own batch still ends within the deadline; never before
            # its batching window ends (which it waits on purpose), or no request could start at all
            # when one batch takes longer than the deadline
            start_by = max((now if since is None else since) + deadline - self.batch_seconds,
                           now + self.config.max_wait_ms / 1000.0)
        q = self._queue
        q.append(_Item(inputs, n, key, fut, now, start_by))
        before = self._queued_samples
        self._queued_samples = before + n
        # wake the loop only when this request changes what it waits for: a new head (its window
        # starts), a batch that became full, or one closed by a request of another shape. Waking it
        # for every request cost a future, a timer and a task step each (a few us of CPU per request)
        if self._waiter is not None and (len(q) == 1 or before < self.config.max_batch_size <= before + n
                                         or key != q[0].key):
            self._wake()
        return fut

    # ---- the loop ------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _sleep(self, delay: float | None) -> None:
        self._waiter = fut = self._loop.create_future()
        handle = self._loop.call_later(delay, self._wake) if delay is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _fill(self, max_bs: int) -> tuple[int, int, bool]:
        """(items, samples) the head batch would take, and whether it can grow no more."""
        q = self._queue
        first = q[0]
        count, samples = 1, first.n
        for i in range(1, len(q)):
            if samples >= max_bs:
                break
            item = q[i]
            if item.key != first.key or samples + item.n > max_bs:
                return count, samples, True
            count += 1
            samples += item.n
        return count, samples, samples >= max_bs

    def _expire(self) -> None:
        """Fail queued requests, oldest first, that did not start by their deadline."""
        q = self._queue
        now = time.monotonic()
        while q and q[0].start_by is not None and q[0].start_by < now:
            item = q.popleft()
            self._queued_samples -= item.n
            if not item.future.done():
                item.future.set_exception(Overloaded("overloaded: the request could not start within its deadline",
                                                     retry_after=self.estimated_finish()))
            # counted in optimodel_rejected_total by whoever awaits the future (REST and gRPC alike),
            # not here as well: each refusal counts once

    async def _loop_forever(self) -> None:
        while True:
            self._expire()
            if not self._queue:
                if self._closing:
                    return
                await self._sleep(None)
                continue
            cfg = self.config
            count, samples, closed = self._fill(cfg.max_batch_size)
            wait_left = self._queue[0].enqueued + cfg.max_wait_ms / 1000.0 - time.monotonic()
            if self._running == 0:
                if closed or wait_left <= 0 or self._closing:
                    self._dispatch(count, samples)
                    continue
                await self._sleep(wait_left)
            elif closed and self._running < self._max_in_engine:
                self._dispatch(count, samples)
            else:
                # the engine is busy: keep growing the batch; its completion wakes us
                await self._sleep(None)

    def _dispatch(self, count: int, samples: int) -> None:
        items = [self._queue.popleft() for _ in range(count)]
        self._queued_samples -= samples
        self._running += 1
        self._idle.clear()
        self.batches += 1
        loop, complete = self._loop, self._complete
        self._jobs.put((self._execute, (items,),
                        lambda result, exc: loop.call_soon_threadsafe(complete, items, samples, result, exc)))

    def _execute(self, items: list[_Item]):
        """In the engine thread: concatenate once, run, split back into per-request views.

        Returns (start, end, [(item, outputs)], [late items]). A staged batch starts only when the
        one before it ends: a request in it whose latest start has passed by then is not run (it
        could only answer late) but handed back late, to be failed like one that expired queued.
        """
        t0 = time.monotonic()
        late = [it for it in items if it.start_by is not None and it.start_by < t0]
        if late:
            items = [it for it in items if it.start_by is None or it.start_by >= t0]
            if not items:
                return t0, t0, [], late
        if len(items) == 1:
            feeds = items[0].inputs
        else:
            feeds = {name: np.concatenate([it.inputs[name] for it in items]) for name in items[0].inputs}
        out = self._run_fn(feeds)
        t1 = time.monotonic()
        if len(items) == 1:
            return t0, t1, [(items[0], out)], late
        parts, offset = [], 0
        for it in items:
            parts.append((it, {k: v[offset:offset + it.n] for k, v in out.items()}))
            offset += it.n
        return t0, t1, parts, late

    def _complete(self, items: list[_Item], samples: int, result, exc: BaseException | None) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()
        self._wake()
        if exc is not None:
            log.error("engine failed on a batch of %d: %s", samples, exc)
            err = EngineError(f"engine failed: {exc}")
            for it in items:
                if not it.future.done():
                    it.future.set_exception(err)
            if self._metrics is not None:
                self._metrics.error("engine", len(items))
            return
        t0, t1, parts, late = result
        for it in late:
            if not it.future.done():
                it.future.set_exception(Overloaded("overloaded: the request could not start within its deadline",
                                                   retry_after=self.estimated_finish()))
        if not parts:
            return
        self.loop_lag = 0.75 * self.loop_lag + 0.25 * (time.monotonic() - t1)
        # weight 1/4: follows a load change within a few batches, smooths one slow batch
        took = t1 - t0
        if self.batch_seconds == 0:
            self.batch_seconds = took
        else:
            self.batch_deviation = 0.75 * self.batch_deviation + 0.25 * abs(took - self.batch_seconds)
            self.batch_seconds = 0.75 * self.batch_seconds + 0.25 * took
        m = self._metrics
        if m is not None:
            m.compute.observe(took)
            m.batch_size.observe(samples - sum(it.n for it in late) if late else samples)
        for it, part in parts:
            if m is not None:
                m.queue_wait.observe(t0 - it.enqueued)
            if not it.future.done():
                it.future.set_result(part)
