"""Helpers of the operator tests: run kopf in the test loop, play the cluster's controllers, read results."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable

import kopf

from optimodel.artifact import EngineInfo, Manifest, publish
from optimodel.build import BuildResult, exit_code_for
from optimodel.spec import API_GROUP, API_VERSION, KIND, PLURAL

OM = f"{API_GROUP}/{API_VERSION}/{PLURAL}"
TOOLCHAIN = {"onnx": "1.17.0", "onnxruntime": "1.20.0", "torch": "2.5.0", "tensorrt": "10.6.0"}
NS = "ml"

@contextlib.asynccontextmanager
async def running_operator(namespaces: tuple[str, ...] = ()):
    """kopf in a task of the test's loop (what kopf.testing.KopfTask does in newer kopf)."""
    import optimodel_operator.handlers  # noqa: F401  (registers the handlers once)

    stop, ready = asyncio.Event(), asyncio.Event()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.exit_timeout = 0.1  # tests stop the operator many times
    settings.queueing.idle_timeout = 0.5
    settings.background.instant_exit_timeout = 0.1
    memo = kopf.Memo()
    task = asyncio.create_task(kopf.operator(
        clusterwide=not namespaces, namespaces=list(namespaces), standalone=True,
        settings=settings, memo=memo, stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield memo
    finally:
        # Cancelling (not the stop flag): kopf then cancels the tasks it finds in the loop at once
        # instead of giving them 5 s, and here those include the API server's own watch handlers.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition"):
    """Poll check() until it returns something truthy (and return that)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (KeyError, AssertionError, TypeError, IndexError) as exc:
            last_exc = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def gpu_node(name: str, major: int, minor: int, product: str, gpus: int = 8, ready: bool = True,
             cordoned: bool = False) -> dict:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "nvidia.com/gpu.compute.major": str(major), "nvidia.com/gpu.compute.minor": str(minor),
            "nvidia.com/gpu.product": product, "nvidia.com/gpu.family": "x"}},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64"},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


A100 = ("a100", 8, 0, "NVIDIA-A100-SXM4-80GB")
H100 = ("h100", 9, 0, "NVIDIA-H100-80GB-HBM3")
L4 = ("l4", 8, 9, "NVIDIA-L4")


def model(name: str = "digits", **spec_overrides) -> dict:
    spec = {
        "model": {"uri": "file:///models/digits.onnx", "format": "onnx",
                  "sha256": "a" * 64,
                  "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 1, 8, 8]}]},
        "optimization": {"precision": "fp16"},
        "serving": {"replicas": 2, "maxBatchSize": 32, "batching": {"maxWaitMs": 2.0}},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def jobs(kmock: Emulator, name: str | None = None) -> list[dict]:
    return [j for j in kmock.live("batch/v1/jobs", NS)
            if name is None or j["metadata"]["labels"]["optimodel.io/model"] == name]


def deployments(kmock: Emulator, name: str | None = None) -> dict[str, dict]:
    return {d["metadata"]["labels"]["optimodel.io/arch"]: d for d in kmock.live("apps/v1/deployments", NS)
            if name is None or d["metadata"]["labels"]["optimodel.io/model"] == name}


def om(kmock: Emulator, name: str = "digits") -> dict:
    return kmock.get(OM, NS, name)


def condition(kmock: Emulator, type_: str, name: str = "digits") -> dict | None:
    for c in (om(kmock, name) or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return None


def engine(kmock: Emulator, arch: str, name: str = "digits") -> dict | None:
    for e in (om(kmock, name) or {}).get("status", {}).get("engines", []):
        if e["arch"] == arch:
            return e
    return None


def publish_engine(tmp_path: Path, uri: str, key: str, arch: str, name: str = "digits") -> None:
    """Publish a tiny artifact as the builder would: the files, then the manifest."""
    work = tmp_path / f"build-{key}"
    work.mkdir(exist_ok=True)
    (work / "model.plan").write_bytes(b"engine for " + arch.encode())
    manifest = Manifest(cache_key=key, model_name=name, namespace=NS, arch=arch,
                        engine=EngineInfo(file="model.plan", format="tensorrt" if arch != "cpu" else "onnx",
                                          precision="fp16"),
                        inputs=[{"name": "input", "dtype": "float32", "shape": [-1, 1, 8, 8]}],
                        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
                        max_batch_size=32, versions=TOOLCHAIN, files=[])
    publish(work, manifest, uri)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _true(type_: str, reason: str, message: str = "") -> dict:
    now = _now()
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


async def start_job(kmock: Emulator, job: dict) -> None:
    """Play the Job controller taking a new Job: startTime and one active pod."""
    name = job["metadata"]["name"]
    if "startTime" not in (kmock.get("batch/v1/jobs", NS, name) or {}).get("status", {}):
        await kmock.patch_status("batch/v1/jobs", NS, name, {"startTime": _now(), "active": 1, "ready": 0})


async def terminate_pod(kmock: Emulator, job: dict, message: str, exit_code: int, attempt: int = 1) -> dict:
    """Play kubelet: the Job's pod ran and terminated with this termination message and exit code."""
    labels = job["metadata"]["labels"]
    now = _now()
    pod = await kmock.put("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job['metadata']['name']}-{attempt}x", "namespace": NS,
                     "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                "job-name": job["metadata"]["name"],
                                "batch.kubernetes.io/job-name": job["metadata"]["name"]}},
        "spec": job["spec"]["template"]["spec"],
        "status": {"phase": "Running", "startTime": now, "containerStatuses": [{
            "name": "builder", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": now}}}]},
    })
    return await kmock.patch_status("v1/pods", NS, pod["metadata"]["name"], {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [{"name": "builder", "ready": False, "restartCount": 0, "state": {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message,
            "startedAt": now, "finishedAt": _now()}}}]})


async def complete_job(kmock: Emulator, job: dict) -> None:
    """Play the Job controller after its pod succeeded: SuccessCriteriaMet first, then Complete."""
    name = job["metadata"]["name"]
    met = _true("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")
    await kmock.patch_status("batch/v1/jobs", NS, name, {"active": None, "succeeded": 1, "conditions": [met]})
    await kmock.patch_status("batch/v1/jobs", NS, name, {
        "completionTime": _now(),
        "conditions": [met, _true("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]})


def _fails_job(job: dict, exit_code: int) -> bool:
    """Whether the Job's podFailurePolicy has a FailJob rule matching this exit code."""
    for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if rule.get("action") != "FailJob" or not codes:
            continue
        if codes.get("containerName") not in (None, "builder"):
            continue
        matched = exit_code in codes["values"]
        if matched == (codes["operator"] == "In"):
            return True
    return False


async def fail_job(kmock: Emulator, job: dict, reason: str, message: str) -> None:
    """Play the Job controller: FailureTarget first (pods still terminating), then Failed."""
    name = job["metadata"]["name"]
    target = _true("FailureTarget", reason, message)
    await kmock.patch_status("batch/v1/jobs", NS, name, {"active": None, "conditions": [target]})
    await kmock.patch_status("batch/v1/jobs", NS, name, {"conditions": [target, _true("Failed", reason, message)]})


async def finish_job(kmock: Emulator, tmp_path: Path, job: dict, *, succeed: bool = True,
                     reason: str = "Succeeded", message: str = "", accuracy: dict | None = None,
                     publish_artifact: bool = True, exit_code: int | None = None) -> int:
    """Play the Job controller and kubelet for a whole run: a pod that terminates with the builder's
    result line before the Job's conditions follow; a failed pod is retried up to backoffLimit unless
    the Job's podFailurePolicy fails the Job on its exit code. Returns the number of pods it ran."""
    labels = job["metadata"]["labels"]
    key, arch = labels["optimodel.io/cache-key"], labels["optimodel.io/arch"]
    # the operator creates the request after its Job (the Job owns it), as a pod waits for its mount
    request = await eventually(lambda: kmock.get("v1/configmaps", NS, job["metadata"]["name"]),
                               what="the build request ConfigMap")
    uri = json.loads(request["data"]["request.json"])["artifactUri"]
    if succeed and publish_artifact:
        publish_engine(tmp_path, uri, key, arch, labels["optimodel.io/model"])
    result = BuildResult(state="Succeeded" if succeed else "Failed", reason=reason, cache_key=key,
                         message=message, artifact_uri=uri if succeed else None, accuracy=accuracy)
    if exit_code is None:
        exit_code = 0 if succeed else exit_code_for(result.reason)
    await start_job(kmock, job)
    if succeed:
        await terminate_pod(kmock, job, result.line(), 0)
        await complete_job(kmock, job)
        return 1
    limit = job["spec"].get("backoffLimit", 6)
    for attempt in range(1, limit + 2):
        await terminate_pod(kmock, job, result.line(), exit_code, attempt)
        await kmock.patch_status("batch/v1/jobs", NS, job["metadata"]["name"], {"failed": attempt})
        if _fails_job(job, exit_code):
            await fail_job(kmock, job, "PodFailurePolicy",
                           f"Container builder for pod {NS}/{job['metadata']['name']}-{attempt}x failed with "
                           f"exit code {exit_code} matching FailJob rule at index 0")
            return attempt
    await fail_job(kmock, job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    return limit + 1


def rollout_status(dep: dict, *, updated: int, available: int, old: int = 0, stuck: bool = False) -> dict:
    """The Deployment controller's status: `updated` pods of the current template (`available` of
    them ready), `old` pods of the previous one still running (available), as mid-surge."""
    spec_replicas = dep["spec"]["replicas"]
    total = updated + old
    now = _now()
    progressing = ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                    "message": f'ReplicaSet "{dep["metadata"]["name"]}-7d9c" has timed out progressing.'}
                   if stuck else
                   {"type": "Progressing", "status": "True",
                    "reason": "NewReplicaSetAvailable" if updated == total == available == spec_replicas
                    else "ReplicaSetUpdated", "message": "progressing"})
    ready = available + old
    return {"observedGeneration": dep["metadata"]["generation"], "replicas": total, "updatedReplicas": updated,
            "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": max(0, total - ready),
            "conditions": [{"type": "Available", "status": "True" if ready >= spec_replicas - 1 else "False",
                            "reason": "MinimumReplicasAvailable", "lastUpdateTime": now,
                            "lastTransitionTime": now},
                           {**progressing, "lastUpdateTime": now, "lastTransitionTime": now}]}


async def make_available(kmock: Emulator, name: str = "digits") -> None:
    """Play the Deployment controller: every Deployment of the model rolled out, all replicas available."""
    for dep in deployments(kmock, name).values():
        replicas = dep["spec"]["replicas"]
        await kmock.patch_status("apps/v1/deployments", NS, dep["metadata"]["name"],
                                 rollout_status(dep, updated=replicas, available=replicas))
