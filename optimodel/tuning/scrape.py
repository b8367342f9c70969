"""Observations from a server's own /metrics, for one machine without Prometheus.

Each scrape keeps the cumulative counters; an observation is the difference
between two scrapes (a counter that went down, as after a restart, counts from zero).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from optimodel.tuning.observation import (BATCH_SIZE, COMPUTE, LATENCY, MAX_WAIT, QUEUE_WAIT, REJECTED,
                                          Observation, ObservationError, bucket_deltas, fraction_below,
                                          quantile_interval)


@dataclass
class Snapshot:
    at: float
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)   # histogram → le → cumulative
    sums: dict[str, float] = field(default_factory=dict)                   # histogram or counter → value
    counts: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str, at: float, model: str | None = None, arch: str | None = None) -> Snapshot:
    snap = Snapshot(at=at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if model is not None and s.labels.get("model") != model:
                continue
            if arch is not None and s.labels.get("arch") != arch:
                continue
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                per = snap.buckets.setdefault(s.name[:-7], {})
                per[le] = per.get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                snap.sums[s.name[:-4]] = snap.sums.get(s.name[:-4], 0.0) + s.value
            elif s.name.endswith("_count"):
                snap.counts[s.name[:-6]] = snap.counts.get(s.name[:-6], 0.0) + s.value
            elif s.name == REJECTED:
                snap.sums[REJECTED] = snap.sums.get(REJECTED, 0.0) + s.value
            elif s.name == MAX_WAIT:
                snap.gauges[MAX_WAIT] = s.value
    if LATENCY not in snap.buckets:
        raise ObservationError("MetricsMissing", f"the server's /metrics has no {LATENCY} histogram"
                                                 + (f" for model={model!r} arch={arch!r}" if model else ""))
    return snap


def observation_between(before: Snapshot, now: Snapshot, slo_ms: float) -> Observation:
    seconds = max(now.at - before.at, 1e-9)

    def delta(table: str, name: str) -> float:
        a, b = getattr(now, table).get(name, 0.0), getattr(before, table).get(name, 0.0)
        return a - b if a >= b else a

    lat = bucket_deltas(now.buckets[LATENCY], before.buckets.get(LATENCY))
    answered = lat[-1][1] if lat else 0.0
    queue = bucket_deltas(now.buckets.get(QUEUE_WAIT, {}), before.buckets.get(QUEUE_WAIT))
    batches = delta("counts", BATCH_SIZE)
    rejected = delta("sums", REJECTED)
    return Observation(
        seconds=seconds,
        samples=int(round(answered)),
        arrival_rps=(answered + rejected) / seconds,
        p99_ms=quantile_interval(lat, 0.99),
        under_slo=fraction_below(lat, slo_ms),
        mean_batch=delta("sums", BATCH_SIZE) / batches if batches > 0 else None,
        queue_p99_ms=quantile_interval(queue, 0.99),
        engine_ms=1000.0 * delta("sums", COMPUTE) / delta("counts", COMPUTE) if delta("counts", COMPUTE) > 0 else None,
        reject_rps=rejected / seconds,
        window_ms=now.gauges.get(MAX_WAIT),
    )


class MetricsScraper:
    """GET <base>/metrics and difference it with the previous scrape."""

    def __init__(self, base_url: str, model: str | None = None, arch: str | None = None, slo_ms: float = math.inf,
                 client: httpx.Client | None = None, clock: Callable[[], float] = time.monotonic):
        self.url = base_url.rstrip("/") + "/metrics"
        self.model, self.arch, self.slo_ms = model, arch, slo_ms
        self.client = client or httpx.Client(timeout=5.0)
        self.clock = clock
        self.previous: Snapshot | None = None

    def scrape(self) -> Snapshot:
        try:
            resp = self.client.get(self.url)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise ObservationError("MetricsUnavailable", f"GET {self.url}: {exc}") from exc
        return parse_metrics(resp.text, self.clock(), self.model, self.arch)

    def observe(self) -> Observation | None:
        """The observation since the last call; None on the first (it only sets the baseline)."""
        now = self.scrape()
        before, self.previous = self.previous, now
        if before is None:
            return None
        return observation_between(before, now, self.slo_ms)
