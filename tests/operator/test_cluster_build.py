"""examples/digits-cnn-int8-cluster.yaml through the operator with the real builder.

The emulator has no kubelet, so the test plays it: it runs the Job's container
command (`python -m builder_job --request FILE`) on the request ConfigMap the
operator rendered, with the container's environment, in a folder where the
model's code is not importable: the code must arrive as spec.model.code says.
Then it writes the pod and Job statuses as a cluster does (the pod terminates
with the builder's termination message, then SuccessCriteriaMet, then Complete).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from optimodel.cache_key import toolchain_versions
from optimodel.target import CPU

from operator_helpers import (NS, OM, complete_job, condition, deployments, engine, eventually, jobs,
                              make_available, running_operator, start_job, terminate_pod)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits-cnn-int8-cluster.yaml"


async def run_builder_as_the_pod(job: dict, request: dict, tmp_path: Path) -> tuple[int, str]:
    """The Job's container command on the rendered request; (exit code, termination message)."""
    pod_dir = tmp_path / "pod"
    (pod_dir / "request").mkdir(parents=True)
    (pod_dir / "request" / "request.json").write_text(request["data"]["request.json"])
    termination_log = pod_dir / "termination-log"
    termination_log.touch()  # kubelet creates it; the builder writes it only when it exists
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = [sys.executable if c == "python" else c for c in container["command"]]
    command[command.index("--request") + 1] = str(pod_dir / "request" / "request.json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({e["name"]: e["value"] for e in container["env"]})
    env.update(HOME=str(pod_dir), OPTIMODEL_TERMINATION_LOG=str(termination_log),
               OPTIMODEL_PROFILE_SECONDS="0.02")  # the latency profile is not what this test checks
    proc = await asyncio.create_subprocess_exec(*command, cwd=pod_dir, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert termination_log.read_text(), out.decode()[-3000:]
    return proc.returncode, termination_log.read_text()


@pytest.mark.slow
async def test_cluster_example_builds_with_its_code_and_reports_accuracy(kmock, operator_env, digits_build,
                                                                           monkeypatch, tmp_path):
    pvc = tmp_path / "pvc"
    files = pvc / "models" / "digits"
    files.mkdir(parents=True)
    (pvc / "optimodel-store").mkdir()
    for name in ("digits_cnn.pt", "digits_train.npz", "digits_calib.npz", "digits_test.npz"):
        shutil.copy(digits_build / name, files / name)
    shutil.copy(ROOT / "examples" / "digits_cnn.py", files / "digits_cnn.py")
    # as the chart runs it: no file:// URIs, a pvc:// store mounted at $OPTIMODEL_PVC_ROOT
    monkeypatch.delenv("OPTIMODEL_ALLOW_FILE_URIS")
    monkeypatch.setenv("OPTIMODEL_STORE_URI", "pvc://optimodel-store/artifacts")
    monkeypatch.setenv("OPTIMODEL_PVC_ROOT", str(pvc))
    # the versions the builder "image" (this environment) has, as the chart passes them; the
    # builder refuses a request whose key names others (tests/builder/test_bad_input.py)
    monkeypatch.setenv("OPTIMODEL_BUILDER_TOOLCHAIN", json.dumps(toolchain_versions(CPU)))

    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = NS
    name = manifest["metadata"]["name"]
    async with running_operator():
        await kmock.put(OM, manifest)
        job = (await eventually(lambda: jobs(kmock, name), what="the CPU builder Job"))[0]
        assert job["metadata"]["labels"]["optimodel.io/arch"] == "cpu"
        request = await eventually(lambda: kmock.get("v1/configmaps", NS, job["metadata"]["name"]),
                                   what="the request ConfigMap")
        assert json.loads(request["data"]["request.json"])["source"]["code"]["uri"] == \
            "pvc://models/digits/digits_cnn.py"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"models", "optimodel-store"}

        await start_job(kmock, job)
        exit_code, message = await run_builder_as_the_pod(job, request, tmp_path)
        assert exit_code == 0, message
        await terminate_pod(kmock, job, message, exit_code)
        await complete_job(kmock, job)

        eng = await eventually(lambda: (engine(kmock, "cpu", name) or {}).get("accuracy") and engine(kmock, "cpu", name),
                               timeout=20, what="the cpu engine with its accuracy")
        assert eng["state"] == "Ready"
        accuracy = eng["accuracy"]
        assert accuracy["metric"] == "top1" and accuracy["original"] > 0.9
        assert accuracy["optimized"] > 0.9
        assert accuracy["drop"] == pytest.approx(max(0.0, accuracy["original"] - accuracy["optimized"]), abs=1e-6)
        assert accuracy["drop"] <= 0.005  # the example's maxDrop
        assert condition(kmock, "AccuracyGatePassed", name)["status"] == "True"

        await eventually(lambda: deployments(kmock, name), what="the cpu Deployment")
        await make_available(kmock, name)
        await eventually(lambda: condition(kmock, "Ready", name)["status"] == "True", what="Ready")
        assert engine(kmock, "cpu", name)["accuracy"] == accuracy
        assert engine(kmock, "cpu", name)["servingCacheKey"] == eng["cacheKey"]
