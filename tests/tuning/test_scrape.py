"""The /metrics source: deltas between scrapes of the server's real exposition, resets, absent histograms."""

from __future__ import annotations

import pytest

from optimodel.tuning.observation import ObservationError
from optimodel.tuning.scrape import observation_between, parse_metrics
from serving_image.metrics import ServerMetrics


def exposition(m: ServerMetrics) -> str:
    return m.exposition()[0].decode()


def test_deltas_between_two_scrapes_of_a_real_exposition():
    m = ServerMetrics("digits", "cpu")
    m.max_wait_ms.set(4)
    for _ in range(50):
        m.latency.observe(0.003)
    before = parse_metrics(exposition(m), at=100.0, model="digits", arch="cpu")
    for _ in range(990):
        m.latency.observe(0.0085)
    for _ in range(10):
        m.latency.observe(0.0405)
    for _ in range(100):
        m.batch_size.observe(10)
        m.compute.observe(0.002)
        m.queue_wait.observe(0.004)
    m.rejected("queue_full", 20)
    obs = observation_between(before, parse_metrics(exposition(m), at=110.0, model="digits", arch="cpu"), slo_ms=25)
    assert obs.samples == 1000 and obs.seconds == 10.0
    assert obs.arrival_rps == pytest.approx(102.0) and obs.reject_rps == pytest.approx(2.0)
    assert (obs.p99_ms.lo, obs.p99_ms.hi) == (8.0, 9.0)  # 990 of 1000 at 8.5 ms: the 99th is in 8–9 ms
    assert obs.under_slo == pytest.approx(0.99)
    assert obs.mean_batch == pytest.approx(10) and obs.engine_ms == pytest.approx(2.0)
    # 4 ms is a bucket bound, and buckets are "≤ le": the 3–4 ms bucket holds it
    assert (obs.queue_p99_ms.lo, obs.queue_p99_ms.hi) == (3.0, 4.0) and obs.window_ms == 4


def test_a_restarted_server_counts_from_zero():
    old = ServerMetrics("digits", "cpu")
    for _ in range(5000):
        old.latency.observe(0.002)
    before = parse_metrics(exposition(old), at=0.0)
    new = ServerMetrics("digits", "cpu")
    for _ in range(300):
        new.latency.observe(0.012)
    obs = observation_between(before, parse_metrics(exposition(new), at=5.0), slo_ms=25)
    assert obs.samples == 300 and (obs.p99_ms.lo, obs.p99_ms.hi) == (11.0, 12.0)


def test_absent_or_renamed_histograms_are_a_reason():
    with pytest.raises(ObservationError) as exc:
        parse_metrics("# TYPE other_seconds histogram\nother_seconds_count 3\n", at=0.0, model="m", arch="cpu")
    assert exc.value.reason == "MetricsMissing" and "optimodel_request_latency_seconds" in str(exc.value)
    with pytest.raises(ObservationError):
        parse_metrics(exposition(ServerMetrics("digits", "cpu")), at=0.0, model="other", arch="cpu")
