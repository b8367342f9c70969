"""Profile stage: latency of the compiled engine per batch size, the tuner's prior.

Each batch size runs for a time budget (at least min_iters, at most max_iters
timed runs after a warm-up), so a slow engine finishes and a fast one gets
enough samples for a meaningful p99.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from optimodel.batching import batch_size_ladder
from optimodel.spec import TensorSpec

from builder_job.runtime import Runner, example_inputs


@dataclass(frozen=True)
class ProfileSettings:
    seconds_per_batch: float = 1.0
    min_iters: int = 10
    max_iters: int = 500
    warmup: int = 3


def profile_latency(runner: Runner, inputs: list[TensorSpec], max_batch_size: int,
                    data: dict[str, np.ndarray] | None = None,
                    settings: ProfileSettings = ProfileSettings()) -> dict[str, dict[str, float]]:
    """{"<batch>": {p50Ms, p95Ms, p99Ms, meanMs, iterations, samplesPerSecond}}."""
    report: dict[str, dict[str, float]] = {}
    for batch in batch_size_ladder(max_batch_size):
        feeds = example_inputs(inputs, batch=batch, data=data)
        for _ in range(settings.warmup):
            runner(feeds)
        times: list[float] = []
        deadline = time.perf_counter() + settings.seconds_per_batch
        while len(times) < settings.max_iters and (len(times) < settings.min_iters or time.perf_counter() < deadline):
            start = time.perf_counter()
            runner(feeds)
            times.append((time.perf_counter() - start) * 1000.0)
        ms = np.asarray(times)
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        report[str(batch)] = {
            "p50Ms": round(float(p50), 4),
            "p95Ms": round(float(p95), 4),
            "p99Ms": round(float(p99), 4),
            "meanMs": round(float(ms.mean()), 4),
            "iterations": len(times),
            "samplesPerSecond": round(batch * 1000.0 / float(ms.mean()), 2),
        }
    return report
