"""Prometheus metrics of one served model, in a registry of its own.

A per-app CollectorRegistry (not the global one) lets several servers live in one
test process. Names are what the tuner's PromQL reads; keep them stable:

  optimodel_request_latency_seconds   histogram, handler entry to response ready
  optimodel_queue_wait_seconds        histogram, enqueue to engine start
  optimodel_compute_seconds           histogram, one engine call (one batch)
  optimodel_batch_size                histogram, samples per engine call
  optimodel_inflight_requests         gauge
  optimodel_rejected_total{reason}    counter: queue_full, deadline, body_too_large, not_ready, shutting_down
  optimodel_errors_total{reason}      counter: bad_request, engine, body_timeout, non_finite_output, ...
  optimodel_max_wait_ms, optimodel_max_batch_size   gauges of the config in force

The per-request ones (the histograms, inflight) are plain counters the event loop bumps
without locks and a collector turns into the exposition at scrape time: prometheus_client's
Histogram.observe takes a lock and walks the buckets in Python, and two of them plus two gauge
updates per request were a measurable share of the server's CPU per request. Only the event
loop thread may touch them (the HTTP and gRPC handlers and the batcher's completions all run
there).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


def latency_buckets() -> list[float]:
    """0.5 ms .. 10 s. The tuner reads p99 as the interval between two bounds, so the steps stay
    within 7.5 % of the value from 20 ms to 1 s, and the SLOs people set (10, 20, 25, 30, 40, 50,
    60, 75, 80, 100, 120, 150, 200, 250, 300, 500, 1000 ms) are bounds, making the share of
    requests within the SLO exact. 116 buckets."""
    ms = [0.5]
    ms += [float(x) for x in range(1, 31)]            # 1 ms steps to 30 ms
    ms += [float(x) for x in range(32, 71, 2)]        # 2 ms steps to 70 ms
    ms += [float(x) for x in range(75, 151, 5)]       # 5 ms steps to 150 ms
    ms += [float(x) for x in range(160, 401, 10)]     # 10 ms steps to 400 ms
    ms += [float(x) for x in range(425, 701, 25)]
    ms += [float(x) for x in range(750, 1001, 50)]
    ms += [1500.0, 2000.0, 3000.0, 5000.0, 7500.0, 10000.0]
    return [m / 1000.0 for m in ms]


def batch_buckets() -> list[float]:
    out, b = [], 1
    while b <= 4096:
        out.append(float(b))
        if b >= 2 and b * 3 // 2 <= 4096:
            out.append(float(b * 3 // 2))
        b *= 2
    return sorted(set(out))


class LoopHistogram:
    """A histogram for one thread: observe() is one bisect and two additions, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]):
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "<= le"
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for le, n in zip([*map(floatToGoString, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((le, total))
        return out


class LoopGauge:
    """A gauge for one thread: a plain number."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n

    def set(self, value: float) -> None:
        self.value = value


class _LoopCollector:
    """Exposes the loop-side histograms and gauges of one ServerMetrics under their stable names."""

    def __init__(self, metrics: "ServerMetrics"):
        self.m = metrics

    def collect(self):
        m, labels = self.m, list(self.m._key)
        for name, doc, hist in m._histograms:
            family = HistogramMetricFamily(name, doc, labels=["model", "arch"])
            family.add_metric(labels, hist.cumulative(), hist.sum)
            yield family
        for name, doc, gauge in m._gauges:
            family = GaugeMetricFamily(name, doc, labels=["model", "arch"])
            family.add_metric(labels, gauge.value)
            yield family


class ServerMetrics:
    def __init__(self, model: str, arch: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ("model", "arch")
        lat = latency_buckets()
        r = self.registry
        self._rejected = Counter("optimodel_rejected_total", "Requests refused without running them",
                                 labels + ("reason",), registry=r)
        self._errors = Counter("optimodel_errors_total", "Requests that failed", labels + ("reason",), registry=r)
        self._max_wait = Gauge("optimodel_max_wait_ms", "Batching window in force", labels, registry=r)
        self._max_batch = Gauge("optimodel_max_batch_size", "Largest batch in force", labels, registry=r)
        key = (model, arch)
        self.latency = LoopHistogram(lat)
        self.queue_wait = LoopHistogram(lat)
        self.compute = LoopHistogram(lat)
        self.batch_size = LoopHistogram(batch_buckets())
        self.inflight = LoopGauge()
        self._histograms = [
            ("optimodel_request_latency_seconds", "Infer request latency in the server", self.latency),
            ("optimodel_queue_wait_seconds", "Time a request waited for its batch to start", self.queue_wait),
            ("optimodel_compute_seconds", "Engine time of one batch", self.compute),
            ("optimodel_batch_size", "Samples per engine call", self.batch_size),
        ]
        self._gauges = [("optimodel_inflight_requests", "Infer requests accepted and not yet answered",
                         self.inflight)]
        # children resolved once: .labels() on every request is a dict lookup plus a lock
        self.max_wait_ms = self._max_wait.labels(*key)
        self.max_batch_size = self._max_batch.labels(*key)
        self._key = key
        r.register(_LoopCollector(self))
        self._rejected_children: dict[str, Counter] = {}
        self._error_children: dict[str, Counter] = {}
        for reason in ("queue_full", "deadline", "body_too_large", "not_ready"):
            self.rejected(reason, 0)
        for reason in ("bad_request", "engine"):
            self.error(reason, 0)

    def rejected(self, reason: str, n: int = 1) -> None:
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self._rejected.labels(*self._key, reason)
        child.inc(n)

    def error(self, reason: str, n: int = 1) -> None:
        child = self._error_children.get(reason)
        if child is None:
            child = self._error_children[reason] = self._errors.labels(*self._key, reason)
        child.inc(n)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
