"""Observations from Prometheus' HTTP query API, per (namespace, model, arch).

Every figure is a rate over the window first and a sum across pods after
(`sum by (le) (rate(..._bucket[w]))`), so pods that come and go add up correctly.
The p99 is read from the summed bucket rates by observation.quantile_interval,
which is histogram_quantile's bucket search without its linear guess inside the
bucket: the policy gets the interval the p99 is known to lie in.

Labels: the server exports `model` and `arch` itself; `namespace` is the scrape
target's namespace, which the Prometheus Operator's PodMonitor adds to every
series (a plain kubernetes_sd config must relabel __meta_kubernetes_namespace to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx

from optimodel.tuning.observation import (BATCH_SIZE, COMPUTE, LATENCY, MAX_WAIT, QUEUE_WAIT, REJECTED,
                                          Observation, ObservationError, fraction_below, quantile_interval)

UNAVAILABLE, MISSING = "PrometheusUnavailable", "MetricsMissing"


@dataclass(frozen=True)
class Selector:
    namespace: str
    model: str
    arch: str

    def __str__(self) -> str:
        esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"')
        return f'namespace="{esc(self.namespace)}",model="{esc(self.model)}",arch="{esc(self.arch)}"'


def queries(sel: Selector, window_s: int) -> dict[str, str]:
    """The PromQL for one (namespace, model, arch) over the last window_s seconds."""
    w, s = f"{int(window_s)}s", str(sel)
    rate = lambda name: f"sum(rate({name}{{{s}}}[{w}]))"
    return {
        "latency_buckets": f"sum by (le) (rate({LATENCY}_bucket{{{s}}}[{w}]))",
        "queue_buckets": f"sum by (le) (rate({QUEUE_WAIT}_bucket{{{s}}}[{w}]))",
        "answered": f"sum(increase({LATENCY}_count{{{s}}}[{w}]))",
        "answered_rps": rate(f"{LATENCY}_count"),
        "rejected_rps": rate(REJECTED),
        "mean_batch": f"{rate(f'{BATCH_SIZE}_sum')} / {rate(f'{BATCH_SIZE}_count')}",
        "engine_s": f"{rate(f'{COMPUTE}_sum')} / {rate(f'{COMPUTE}_count')}",
        "window_ms": f"max({MAX_WAIT}{{{s}}})",
    }


class PrometheusSource:
    def __init__(self, url: str, client: httpx.Client | None = None, timeout_s: float = 5.0):
        if not url:
            raise ObservationError("PrometheusNotConfigured",
                                   "no Prometheus URL: set OPTIMODEL_PROMETHEUS_URL (chart value prometheus.url)")
        self.url = url.rstrip("/")
        self.client = client or httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def query(self, promql: str) -> list[dict]:
        try:
            resp = self.client.get(f"{self.url}/api/v1/query", params={"query": promql})
        except httpx.HTTPError as exc:
            raise ObservationError(UNAVAILABLE, f"Prometheus at {self.url} unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise ObservationError(UNAVAILABLE, f"Prometheus at {self.url} answered HTTP {resp.status_code} "
                                                f"that is not JSON: {resp.text[:200]!r}") from None
        if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else None
            raise ObservationError(UNAVAILABLE, f"Prometheus at {self.url} answered HTTP {resp.status_code}: "
                                                f"{error or str(body)[:200]}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            raise ObservationError(UNAVAILABLE, f"Prometheus answered an unexpected result for {promql!r}")
        return data["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        if not result:
            return None
        value = _value(result[0])
        return None if math.isnan(value) else value

    def buckets(self, promql: str) -> list[tuple[float, float]]:
        out = []
        for series in self.query(promql):
            le = series.get("metric", {}).get("le")
            if le is None:
                continue
            out.append((float(le), _value(series)))
        return sorted(out)

    def observe(self, sel: Selector, window_s: int, slo_ms: float) -> Observation:
        q = queries(sel, window_s)
        latency = self.buckets(q["latency_buckets"])
        if not latency:
            raise ObservationError(MISSING, f"Prometheus has no {LATENCY}_bucket series for {{{sel}}} in the last "
                                            f"{window_s}s: are the pods scraped (PodMonitor) and labelled "
                                            "namespace/model/arch?")
        answered_rps = self.scalar(q["answered_rps"]) or 0.0
        rejected = self.scalar(q["rejected_rps"]) or 0.0
        engine_s = self.scalar(q["engine_s"])
        return Observation(
            seconds=float(window_s),
            samples=int(round(self.scalar(q["answered"]) or 0.0)),
            arrival_rps=answered_rps + rejected,
            p99_ms=quantile_interval(latency, 0.99),
            under_slo=fraction_below(latency, slo_ms),
            mean_batch=self.scalar(q["mean_batch"]),
            queue_p99_ms=quantile_interval(self.buckets(q["queue_buckets"]), 0.99),
            engine_ms=engine_s * 1000.0 if engine_s is not None else None,
            reject_rps=rejected,
            window_ms=self.scalar(q["window_ms"]),
        )


def _value(series: dict) -> float:
    try:
        return float(series["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ObservationError(UNAVAILABLE, f"Prometheus answered a malformed sample {series!r}") from exc
