"""When each OptimizedModel is looked at: the one place that schedules.

Now (a watch event), after a delay (a retry due later: requeue-after), with doubling
backoff (a pass that failed on an API error), or at the resync. The Scheduler lives on the
event loop and only the event loop touches it, so it needs no lock. A model is never in
two passes at once; triggers that arrive before its pass begins are answered by that pass,
and those that arrive during it by one more pass right after.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from optimodel_operator.kube import KubeError

log = logging.getLogger(__name__)
API_RETRY_SECONDS = 0.5  # first requeue after a failed pass, doubling up to the resync period

Key = tuple[str, str]  # (namespace, name) of an OptimizedModel


class Scheduler:
    """When each model is looked at. Event loop only: no locks, because no thread touches it."""

    def __init__(self, work: Callable[[Key], Awaitable[float | None]], max_backoff: float,
                 first_backoff: float = API_RETRY_SECONDS, concurrency: int = 8):
        self.work, self.max_backoff, self.first_backoff = work, max_backoff, first_backoff
        # passes wait for a slot here, where triggers still fold into them, not in an executor's queue
        self.slots = asyncio.Semaphore(concurrency)
        self.running: dict[Key, asyncio.Task] = {}  # waiting for a slot or in a pass
        self.again: set[Key] = set()  # triggered after its pass began: one more pass after this one
        self.timers: dict[Key, asyncio.TimerHandle] = {}
        self.failures: dict[Key, int] = {}
        self.closed = False

    def trigger(self, key: Key, delay: float = 0.0) -> None:
        """Look at key now, or after delay seconds (the earliest asked for wins)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        timer = self.timers.get(key)
        if delay > 0:
            if timer is None or timer.when() > loop.time() + delay:
                if timer is not None:
                    timer.cancel()
                self.timers[key] = loop.call_later(delay, self._due, key)
            return
        if timer is not None:  # looking now answers what the timer would have asked
            timer.cancel()
            del self.timers[key]
        if key in self.running:
            self.again.add(key)
        else:
            self.running[key] = loop.create_task(self._run(key), name=f"reconcile {key[0]}/{key[1]}")

    def _due(self, key: Key) -> None:
        self.timers.pop(key, None)
        self.trigger(key)

    async def _run(self, key: Key) -> None:
        try:
            async with self.slots:
                while True:
                    self.again.discard(key)  # the pass reads what exists from here on
                    after = await self._once(key)
                    if after is not None:
                        self.trigger(key, after)
                    if key not in self.again or self.closed:
                        return
        finally:
            self.running.pop(key, None)

    async def _once(self, key: Key) -> float | None:
        try:
            after = await self.work(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self.failures[key] = self.failures.get(key, 0) + 1
            delay = min(self.first_backoff * 2 ** (failures - 1), self.max_backoff)
            log.warning("reconcile of %s/%s failed (%s); again in %.1f s", *key, exc, delay,
                        exc_info=not isinstance(exc, KubeError))
            return delay
        self.failures.pop(key, None)
        return after

    def forget(self, key: Key) -> None:
        """The model is gone: no retry is due and its failure count starts over if the name comes back."""
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self.failures.pop(key, None)

    def close(self) -> None:
        self.closed = True
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        for task in self.running.values():
            task.cancel()
