"""The operator's tuner against the kmock API server and a real Prometheus scraping a real server.

The cluster parts this machine cannot run are played by the test: the Job controller
(finish_job), the Deployment controller (make_available) and kubelet's ConfigMap volume
(a task copying the ConfigMap's batching.json into the file the real server watches).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optimodel import storage
from operator_helpers import NS, OM, condition, deployments, eventually, finish_job, jobs, make_available, model, om
from tests.tuning.loadgen import OpenLoop, infer_body
from tests.tuning.prometheus_server import Prometheus, free_port, prometheus_binary

ROOT = Path(__file__).resolve().parents[2]
START = 80.0  # a window far over the SLO's budget
SLO = 50.0  # margin for a CPU shared with other test runs: p99 swings by 20 ms here


@pytest.fixture(scope="module")
def digits_artifact(digits_build, tmp_path_factory) -> Path:
    """The digits CNN built for the CPU by the real builder (its report.json has the latency profile)."""
    work = tmp_path_factory.mktemp("digits-artifact")
    shutil.copytree(digits_build, work / "build")
    shutil.copy(ROOT / "examples" / "digits-cnn.yaml", work / "digits-cnn.yaml")
    done = subprocess.run([sys.executable, "-m", "optimodel", "run", str(work / "digits-cnn.yaml"), "--store",
                           str(work / "store"), "--build-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().split("artifact: ", 1)[1])


@pytest.fixture
def server(digits_artifact, tmp_path):
    """A real server for model 'digits' (arch cpu), its batching file at the start window."""
    port, config = free_port(), tmp_path / "batching" / "batching.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"maxWaitMs": START, "maxBatchSize": 32, "maxQueue": 512}))
    proc = subprocess.Popen([sys.executable, "-m", "serving_image", "--artifact", str(digits_artifact), "--config",
                             str(config), "--host", "127.0.0.1", "--port", str(port), "--model-name", "digits"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from optimodel_local.run import wait_ready
    wait_ready(proc, f"http://127.0.0.1:{port}")
    yield port, config
    proc.terminate()
    proc.wait(30)


async def kubelet(kmock, config: Path) -> None:
    """Project the batching ConfigMap into the server's file, as kubelet does for a mounted volume."""
    last = None
    while True:
        cm = kmock.get("v1/configmaps", NS, "digits-batching")
        data = (cm or {}).get("data", {}).get("batching.json")
        if data and data != last:
            tmp = config.with_name(".tmp")
            tmp.write_text(data)
            tmp.replace(config)
            last = data
        await asyncio.sleep(0.2)


def window(kmock) -> float | None:
    cm = kmock.get("v1/configmaps", NS, "digits-batching")
    if not cm:
        return None
    data = json.loads(cm["data"]["batching.json"])
    return (data.get("maxWaitMsByArch") or {}).get("cpu", data["maxWaitMs"])


def tuned_events(kmock) -> list[dict]:
    return [e for e in kmock.live("v1/events", NS) if e["reason"] == "Tuned"]


@pytest.mark.slow
async def test_operator_tunes_from_prometheus_and_survives_its_outage(kmock, operator_env, server, digits_artifact,
                                                                      tmp_path, monkeypatch):
    from operator_helpers import running_operator

    port, config = server
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], namespace=NS).start()
    monkeypatch.setenv("OPTIMODEL_PROMETHEUS_URL", prom.url)
    feeder = asyncio.create_task(kubelet(kmock, config))
    image = np.zeros((1, 1, 8, 8), np.float32)
    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    load = OpenLoop(url, infer_body("image", image), rate=200)
    try:
        async with running_operator():
            spec_serving = {"replicas": 1, "maxBatchSize": 32, "batching": {"maxWaitMs": START, "autotune": {
                "enabled": True, "p99LatencyMs": SLO, "minWaitMs": 0, "maxWaitMs": 100, "intervalSeconds": 5}}}
            await kmock.put(OM, model(targets={"gpuArchitectures": [], "cpu": True}, serving=spec_serving))
            job = (await eventually(lambda: jobs(kmock), what="the cpu builder Job"))[0]
            await finish_job(kmock, tmp_path, job)
            dep = (await eventually(lambda: deployments(kmock).get("cpu"), what="the cpu Deployment"))
            artifact = dep["metadata"]["annotations"]["optimodel.io/artifact-uri"]
            # the test's published engine is a stand-in; its profile is the real build's
            storage.write_bytes_atomic(storage.join(artifact, "report.json"),
                                       (digits_artifact / "report.json").read_bytes())
            await make_available(kmock)
            await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready")
            assert window(kmock) == START

            with load:
                # 1. the window moves, p99 ends under the SLO, ConfigMap and status follow
                await eventually(lambda: window(kmock) is not None and window(kmock) < START, timeout=60,
                                 what="a tuned window in the ConfigMap")
                await eventually(lambda: json.loads(config.read_text()).get("maxWaitMsByArch", {}).get("cpu")
                                 == window(kmock), what="the server's file follows the ConfigMap")
                converged = await eventually(
                    lambda: (c := condition(kmock, "Tuned")) and c["reason"] == "Converged"
                    and om(kmock)["status"]["serving"]["p99Ms"] <= SLO and c, timeout=90,
                    what="Tuned=Converged with p99 under the SLO")
                assert converged["status"] == "True"
                serving = om(kmock)["status"]["serving"]
                assert serving["maxWaitMs"] == window(kmock) and serving["throughput"] > 50
                assert serving["lastTunedTime"] and serving["endpoint"]
                assert tuned_events(kmock) and f"{START:g} →" in tuned_events(kmock)[0]["message"]
                assert om(kmock)["spec"]["serving"]["batching"]["maxWaitMs"] == START  # never spec
                assert condition(kmock, "Ready")["status"] == "True"

                # 2. Prometheus stops: the window holds, the condition says why, no crash
                held = window(kmock)
                prom.stop()
                down = await eventually(lambda: (c := condition(kmock, "Tuned"))
                                        and c["reason"] == "PrometheusUnavailable" and c, timeout=30,
                                        what="Tuned=PrometheusUnavailable")
                assert down["status"] == "False" and prom.url in down["message"]
                assert window(kmock) == held

                # 3. it comes back on the same address: tuning resumes
                prom.start()
                # recovered: decisions from data again (on a busy CPU that may be any data-based reason)
                await eventually(lambda: condition(kmock, "Tuned")["reason"] not in
                                 ("PrometheusUnavailable", "MetricsMissing"), timeout=60, what="Tuned recovered")
                last = om(kmock)["status"]["serving"]["lastTunedTime"]

            # 4. an operator restart resumes from the ConfigMap, not from the spec's window
            with OpenLoop(url, infer_body("image", image), rate=200):
                async with running_operator():
                    await eventually(lambda: om(kmock)["status"]["serving"]["lastTunedTime"] != last, timeout=30,
                                     what="a pass of the restarted operator")
                    assert window(kmock) != START
                    assert not [e for e in tuned_events(kmock) if f"→ {START:g} ms" in e["message"]]
    finally:
        feeder.cancel()
        prom.stop()


async def test_autotune_without_prometheus_says_how_to_configure_it(kmock, operator, tmp_path):
    spec_serving = {"replicas": 1, "maxBatchSize": 32, "batching": {"maxWaitMs": 3, "autotune": {
        "enabled": True, "p99LatencyMs": 50, "intervalSeconds": 5}}}
    await kmock.put(OM, model(targets={"gpuArchitectures": [], "cpu": True}, serving=spec_serving))
    job = (await eventually(lambda: jobs(kmock), what="Job"))[0]
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: deployments(kmock).get("cpu"), what="Deployment")
    await make_available(kmock)
    tuned = await eventually(lambda: condition(kmock, "Tuned"), timeout=15, what="Tuned")
    assert (tuned["status"], tuned["reason"]) == ("False", "PrometheusNotConfigured")
    assert "OPTIMODEL_PROMETHEUS_URL" in tuned["message"] and "prometheus.url" in tuned["message"]
    assert window(kmock) == 3.0
    # the reconcile keeps the tuner's condition: Ready stays about serving
    await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready")
    assert condition(kmock, "Tuned")["reason"] == "PrometheusNotConfigured"


def test_the_tuner_forgets_a_deleted_models_schedule_and_calibration():
    from types import SimpleNamespace

    from optimodel.tuning import policy
    from optimodel_operator.tuner import Tuner

    live = {"metadata": {"uid": "live-uid"}, "spec": {"serving": {"batching": {"autotune": {"enabled": True}}}}}
    ctrl = SimpleNamespace(settings=SimpleNamespace(prometheus_url=None), indexes={"om_index": {(NS, "live"): [live]}})
    tuner = Tuner(ctrl, clock=lambda: 100.0)
    tuner.due["gone-uid"] = 50.0
    tuner.states[("gone-uid", "sm80")] = tuner.states[("live-uid", "sm80")] = policy.TunerState(window_ms=2.0)
    assert tuner.due_models() == [(NS, "live")]
    assert set(tuner.due) == {"live-uid"} and set(tuner.states) == {("live-uid", "sm80")}
