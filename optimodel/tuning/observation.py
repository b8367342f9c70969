"""What the tuner sees of one architecture's serving pods over one interval.

Histograms have finite buckets, so a quantile is known only to lie between two
bucket bounds: p99 is carried as the interval [lo, hi] and the policy reasons on
both ends. Both sources (Prometheus, a server's /metrics) reduce to per-bucket
counts over the interval, and the helpers here turn those into the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# metric names the server exposes (serving_image/metrics.py); PromQL and the scraper use these
LATENCY = "optimodel_request_latency_seconds"
QUEUE_WAIT = "optimodel_queue_wait_seconds"
COMPUTE = "optimodel_compute_seconds"
BATCH_SIZE = "optimodel_batch_size"
REJECTED = "optimodel_rejected_total"
MAX_WAIT = "optimodel_max_wait_ms"


class ObservationError(Exception):
    """The source answered, but not with usable figures; reason is a CamelCase Tuned reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float  # math.inf when the quantile is in the +Inf bucket

    @property
    def mid(self) -> float:
        return self.lo if math.isinf(self.hi) else (self.lo + self.hi) / 2

    def __str__(self) -> str:
        if math.isinf(self.hi):
            return f">{self.lo:g}"
        return f"{self.lo:g}–{self.hi:g}"


@dataclass(frozen=True)
class Observation:
    """Figures over one interval of `seconds`, across every pod of one (model, arch)."""

    seconds: float
    samples: int                         # requests answered (the p99's sample count)
    arrival_rps: float                   # answered + rejected, per second
    p99_ms: Interval | None              # None when nothing was answered
    under_slo: float | None              # fraction answered within the SLO
    mean_batch: float | None             # samples per engine call
    queue_p99_ms: Interval | None        # enqueue to engine start
    engine_ms: float | None              # mean engine time of one batch
    reject_rps: float = 0.0              # 503s (queue full, not ready) per second
    window_ms: float | None = None       # the window the pods report in force

    @property
    def answered_rps(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


Buckets = list[tuple[float, float]]  # (upper bound in seconds, cumulative count), sorted, +Inf last


def quantile_interval(buckets: Buckets, q: float) -> Interval | None:
    """The bucket bounds (in ms) the q-quantile lies between; None when the histogram is empty."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lo = 0.0
    for le, count in buckets:
        if count >= rank - 1e-9:
            return Interval(lo * 1000.0, le * 1000.0 if not math.isinf(le) else math.inf)
        lo = le
    return Interval(lo * 1000.0, math.inf)


def fraction_below(buckets: Buckets, threshold_ms: float) -> float | None:
    """Share of observations ≤ threshold: exact at a bucket bound, linear between bounds otherwise."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total, t = buckets[-1][1], threshold_ms / 1000.0
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if abs(le - t) <= 1e-12 * max(1.0, t):
            return count / total
        if le > t:
            if math.isinf(le):
                return prev_count / total
            share = (t - prev_le) / (le - prev_le)
            return (prev_count + share * (count - prev_count)) / total
        prev_le, prev_count = le, count
    return 1.0


def bucket_deltas(now: dict[float, float], before: dict[float, float] | None) -> Buckets:
    """Cumulative bucket counts over an interval (counter resets, as after a pod restart, count from zero)."""
    out = []
    for le in sorted(now):
        d = now[le] - (before or {}).get(le, 0.0)
        out.append((le, d if d >= 0 else now[le]))
    # cumulative counts must not decrease; a reset in one bucket but not the next would break that
    running = 0.0
    fixed = []
    for le, c in out:
        running = max(running, c)
        fixed.append((le, running))
    return fixed
