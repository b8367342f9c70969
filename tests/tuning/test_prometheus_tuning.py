"""A real Prometheus scraping a real server under open-loop load: the PromQL, and `optimodel run --prometheus`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from optimodel.batching import load_batching_config
from optimodel.tuning.observation import ObservationError
from optimodel.tuning.prometheus import PrometheusSource, Selector
from tests.tuning.loadgen import OpenLoop, infer_body
from tests.tuning.optimodel_run import SLO, START, OptimodelRun, upper
from tests.tuning.prometheus_server import Prometheus, free_port


@pytest.mark.slow
def test_run_tunes_from_a_real_prometheus(tuned_manifest, tmp_path):
    port = free_port()
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], namespace="default").start()
    store = tmp_path / "store"
    try:
        with OptimodelRun(tuned_manifest, store, port, "--tune-interval", "3", "--prometheus", prom.url) as run:
            run.wait_ready()
            prom.wait_for_series('optimodel_request_latency_seconds_count{namespace="default",model="digits-cnn"}')
            image = np.load(tmp_path / "build" / "digits_test.npz")["image"][:1]
            url = f"http://127.0.0.1:{port}/v2/models/digits-cnn/infer"
            source = PrometheusSource(prom.url)
            with OpenLoop(url, infer_body("image", image), rate=200):
                time.sleep(5)
                # the PromQL itself, against what Prometheus scraped
                obs = source.observe(Selector("default", "digits-cnn", "cpu"), 4, SLO)
                assert obs.samples > 200 and 100 < obs.arrival_rps < 300, obs
                assert obs.p99_ms is not None and obs.p99_ms.lo < obs.p99_ms.hi and obs.mean_batch >= 1
                assert obs.engine_ms > 0 and obs.window_ms is not None and obs.queue_p99_ms is not None
                deadline = time.monotonic() + 120  # early exit; long only when a busy CPU keeps p99 up
                while time.monotonic() < deadline:
                    decisions = run.decisions()
                    if any(m["arrow"] == "→" for m in decisions) and decisions[-1]["reason"] == "Converged" \
                            and upper(decisions[-1]["p99"]) <= SLO:
                        break
                    time.sleep(0.5)
            with pytest.raises(ObservationError) as missing:
                source.observe(Selector("default", "no-such-model", "cpu"), 4, SLO)
            assert missing.value.reason == "MetricsMissing"
    finally:
        prom.stop()
    decisions = run.decisions()
    assert decisions, run.output
    moves = [m for m in decisions if m["arrow"] == "→"]
    assert moves and float(moves[0]["old"]) == START and float(moves[0]["new"]) < START, run.output
    after = decisions[decisions.index(moves[0]) + 1:]
    assert any(m["reason"] == "Converged" and upper(m["p99"]) <= SLO for m in after), run.output
    assert load_batching_config(store / "default" / "digits-cnn" / "batching.json").max_wait_ms == \
        float(decisions[-1]["new"])


def test_prometheus_unreachable_and_garbage_are_reasons_not_crashes(tmp_path):
    with pytest.raises(ObservationError) as down:
        PrometheusSource(f"http://127.0.0.1:{free_port()}").observe(Selector("a", "b", "c"), 10, 50)
    assert down.value.reason == "PrometheusUnavailable" and "unreachable" in str(down.value)
    with pytest.raises(ObservationError) as unset:
        PrometheusSource("")
    assert unset.value.reason == "PrometheusNotConfigured" and "OPTIMODEL_PROMETHEUS_URL" in str(unset.value)


def test_prometheus_answering_garbage(tmp_path):
    import http.server

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>not prometheus</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ObservationError) as bad:
            PrometheusSource(f"http://127.0.0.1:{server.server_port}").observe(Selector("a", "b", "c"), 10, 50)
        assert bad.value.reason == "PrometheusUnavailable" and "not JSON" in str(bad.value)
    finally:
        server.shutdown()
