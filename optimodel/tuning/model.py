"""The tuner's model of the server: engine time per batch size and the batcher's rule.

The engine profile comes from the build's report.json (`latency`: meanMs per batch
size, measured by the builder on the target). `predict` replays the server's
batching rule (serving_image/batcher.py: a batch leaves when it is full, or when
the engine is idle and its oldest request has waited the window; while the engine
runs the next batch keeps growing) on Poisson arrivals at a given rate. That is
what lets the policy tell waiting from queueing: the replay shows how much of the
latency a window adds and how much the engine's backlog adds, for every window.
Pure and deterministic (a fixed seed), so a unit test can call it.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineProfile:
    """Mean engine time (ms) per batch size, piecewise linear between measured sizes."""

    points: tuple[tuple[int, float], ...]  # (batch size, mean ms), sorted by size

    @classmethod
    def from_report(cls, report: dict) -> "EngineProfile":
        latency = report.get("latency")
        if not latency:
            raise ValueError("report.json has no 'latency' profile (per batch size)")
        try:
            pts = sorted((int(b), float(v["meanMs"])) for b, v in latency.items())
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"report.json 'latency' is malformed: {exc}") from exc
        return cls(tuple(pts))

    @classmethod
    def from_file(cls, path: Path) -> "EngineProfile":
        return cls.from_report(json.loads(Path(path).read_text()))

    @classmethod
    def affine(cls, fixed_ms: float, per_sample_ms: float, max_batch: int) -> "EngineProfile":
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch} & set(range(1, max_batch + 1)))
        return cls(tuple((b, fixed_ms + per_sample_ms * b) for b in sizes))

    def ms(self, batch: float) -> float:
        pts = self.points
        sizes = [p[0] for p in pts]
        if batch <= sizes[0]:
            return pts[0][1]
        i = bisect.bisect_left(sizes, batch)
        if i >= len(pts):  # beyond the profile: extend the last segment
            (b0, t0), (b1, t1) = pts[-2] if len(pts) > 1 else pts[-1], pts[-1]
            slope = (t1 - t0) / (b1 - b0) if b1 != b0 else t1 / b1
            return t1 + slope * (batch - b1)
        (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)

    def scaled(self, factor: float) -> "EngineProfile":
        return EngineProfile(tuple((b, t * factor) for b, t in self.points))

    def capacity_rps(self, max_batch: int) -> float:
        """Samples per second with every batch full: the most one pod can serve."""
        return max_batch * 1000.0 / self.ms(max_batch)


@dataclass(frozen=True)
class Prediction:
    window_ms: float
    p99_ms: float
    under_slo: float       # share of requests answered within the SLO
    mean_batch: float
    mean_wait_ms: float    # mean time from arrival to engine start
    overloaded: bool       # the backlog grew through the replay


def predict(profile: EngineProfile, rate_rps: float, window_ms: float, max_batch: int, slo_ms: float,
            requests: int = 3000, seed: int = 7) -> Prediction:
    """Latency the server would show at this arrival rate and window (one pod, requests of one sample)."""
    body, mean_batch, mean_wait = _replay(profile, rate_rps, window_ms, max_batch, requests, seed)
    p99 = body[min(len(body) - 1, int(math.ceil(0.99 * len(body))) - 1)]
    under = bisect.bisect_right(body, slo_ms) / len(body)
    return Prediction(window_ms, p99, under, mean_batch, mean_wait, rate_rps >= profile.capacity_rps(max_batch))


@functools.lru_cache(maxsize=4096)
def _replay(profile: EngineProfile, rate_rps: float, window_ms: float, max_batch: int, requests: int,
            seed: int) -> tuple[tuple[float, ...], float, float]:
    """(sorted latencies after the warm-up, mean batch, mean wait); cached, as the tuner asks again each interval."""
    rng = random.Random(seed)
    gap = 1000.0 / max(rate_rps, 1e-6)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(1.0) * gap
        arrivals.append(t)
    lat, waits, batches = [], [], []
    now, free_at, i, head = 0.0, 0.0, 0, 0  # queue is arrivals[head:i]
    n_total = len(arrivals)
    while head < n_total:
        if head == i:  # empty queue: jump to the next arrival
            now = max(now, arrivals[i])
            i += 1
        while i < n_total and arrivals[i] <= now:
            i += 1
        if now < free_at:  # engine busy: the batch grows until it completes (or is full)
            nxt = arrivals[i] if i < n_total else math.inf
            if i - head >= max_batch or nxt > free_at:
                now = free_at
            else:
                now = nxt
            continue
        queued = i - head
        deadline = arrivals[head] + window_ms
        if queued < max_batch and now < deadline:
            nxt = arrivals[i] if i < n_total else math.inf
            now = min(nxt, deadline)
            continue
        n = min(queued, max_batch)
        done = now + profile.ms(n)
        for k in range(head, head + n):
            lat.append(done - arrivals[k])
            waits.append(now - arrivals[k])
        batches.append(n)
        head += n
        free_at = done
    skip = len(lat) // 10  # the replay starts empty: leave out its warm-up
    return (tuple(sorted(lat[skip:])), sum(batches) / len(batches),
            sum(waits[skip:]) / max(1, len(waits) - skip))
