"""Each architecture's own window: the contract, the renderer keeping the tuner's windows, the server's reading,
and a restarted operator resuming from the ConfigMap."""

from __future__ import annotations

import json

from optimodel.batching import BatchingConfig, dump_batching_config
from optimodel.spec import OptimizedModelSpec
from optimodel.tuning import policy
from optimodel.tuning.model import EngineProfile
from optimodel.tuning.observation import Interval, Observation, ObservationError
from optimodel_operator import render
from optimodel_operator.reconcile import _current_by_arch
from optimodel_operator.tuner import current_windows, plan_pass
from serving_image.config_watch import ConfigWatcher


def spec(**autotune) -> OptimizedModelSpec:
    return OptimizedModelSpec.model_validate({
        "model": {"uri": "file:///m.onnx", "format": "onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]},
        "serving": {"maxBatchSize": 32, "batching": {"maxWaitMs": 5, "autotune": {
            "enabled": True, "p99LatencyMs": 50, "minWaitMs": 1, "maxWaitMs": 20, **autotune}}}})


def test_for_arch_picks_the_arch_window_and_drops_the_table():
    config = BatchingConfig(max_wait_ms=5, max_batch_size=32, max_wait_ms_by_arch={"sm80": 12.0, "sm90": 3.0})
    assert config.for_arch("sm80").max_wait_ms == 12.0 and config.for_arch("sm80").max_wait_ms_by_arch == {}
    assert config.for_arch("cpu").max_wait_ms == 5
    assert "maxWaitMsByArch" not in dump_batching_config(BatchingConfig(max_wait_ms=5, max_batch_size=32))


def test_renderer_keeps_the_tuners_windows_clamped_to_the_bounds():
    live = json.dumps({"maxWaitMs": 5, "maxBatchSize": 32, "maxWaitMsByArch": {"sm80": 12, "sm90": 99}})
    config = render.batching_config(spec(), 5, _current_by_arch(live))
    assert config.max_wait_ms_by_arch == {"sm80": 12.0, "sm90": 20.0}
    off = OptimizedModelSpec.model_validate({**spec().wire(), "serving": {"batching": {"maxWaitMs": 7}}})
    assert render.batching_config(off, 5, _current_by_arch(live)).max_wait_ms_by_arch == {}
    assert _current_by_arch("not json") == {}


def test_the_server_applies_only_its_own_arch_window(tmp_path):
    path = tmp_path / "batching.json"
    applied = []
    watcher = ConfigWatcher(path, lambda c: applied.append(c.for_arch("sm90")), interval=0.01)
    path.write_text(json.dumps({"maxWaitMs": 5, "maxBatchSize": 32, "maxWaitMsByArch": {"sm80": 12, "sm90": 3}}))
    watcher.poll()
    assert [c.max_wait_ms for c in applied] == [3.0]


def test_a_restarted_operator_resumes_each_window_from_the_configmap():
    live = json.dumps({"maxWaitMs": 5, "maxBatchSize": 32, "maxWaitMsByArch": {"sm80": 12}})
    assert current_windows(live, ["sm80", "sm90"], 2.0) == {"sm80": 12.0, "sm90": 5.0}
    assert current_windows(None, ["sm80"], 2.0) == {"sm80": 2.0}


def test_a_pass_decides_per_arch_and_reports_the_worst():
    profiles = {"sm80": EngineProfile.affine(4, 0.2, 32), "sm90": EngineProfile.affine(2, 0.1, 32)}

    def observe(arch: str) -> Observation:
        if arch == "sm90":
            raise ObservationError("MetricsMissing", "no optimodel_request_latency_seconds_bucket for sm90")
        return Observation(seconds=30, samples=6000, arrival_rps=200, p99_ms=Interval(30, 32), under_slo=1.0,
                           mean_batch=3.0, queue_p99_ms=Interval(18, 19), engine_ms=4.6, window_ms=18.0)

    result = plan_pass(spec(), ["sm80", "sm90"], {"sm80": 18.0, "sm90": 4.0}, {}, observe, profiles, "now")
    assert result.windows["sm90"] == 4.0                      # held: no data
    assert result.windows["sm80"] < 18.0 and result.config_changed
    assert result.condition["reason"] == "MetricsMissing" and result.condition["status"] == "False"
    assert "sm80:" in result.condition["message"] and "sm90:" in result.condition["message"]
    assert result.serving["throughput"] == 200.0 and result.serving["maxWaitMs"] == result.windows["sm80"]
    assert [e.reason for e in result.events] == ["Tuned"] and "sm80: max_wait_ms 18 →" in result.events[0].message
