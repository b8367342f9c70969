"""The operator against statuses as a real cluster writes them (issue 13): a Deployment
mid-surge, a builder pod that terminates before its Job completes, SuccessCriteriaMet /
FailureTarget before Complete / Failed, the Job's podFailurePolicy, the request
ConfigMap's owner, and what a cluster cannot build (code beside a local manifest,
file:// paths)."""

from __future__ import annotations

import json

import pytest

from operator_helpers import (A100, NS, OM, complete_job, condition, deployments, engine, eventually, finish_job,
                              gpu_node, jobs, make_available, model, om, publish_engine, rollout_status,
                              running_operator, start_job, terminate_pod)
from optimodel.build import BuildResult

GATED = {"precision": "int8", "calibration": {"datasetUri": "file:///data/calib.npz"},
         "accuracyGate": {"datasetUri": "file:///data/gate.npz", "metric": "top1", "maxDrop": 0.01}}
ACCURACY = {"metric": "top1", "original": 0.995556, "optimized": 0.991111, "drop": 0.004445}


async def settled(operator, reconciles: int = 3) -> None:
    """Wait until the operator reconciled a few more times (resync is 0.5 s in these tests), so a
    status it would write for what the test just did is written."""
    start = operator.ctrl.reconciles
    await eventually(lambda: operator.ctrl.reconciles >= start + reconciles, what="more reconciles")


async def serving_one(kmock, tmp_path, **spec) -> None:
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model(**spec))
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: deployments(kmock), what="a Deployment")
    await make_available(kmock)
    await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready")


# ---- 1. a rollout is reported when it happened -------------------------------------------------

async def test_new_engine_serves_only_once_its_own_pods_are_available(kmock, operator, tmp_path):
    await serving_one(kmock, tmp_path, serving={"replicas": 1, "maxBatchSize": 32})
    old_key = engine(kmock, "sm80")["cacheKey"]
    assert engine(kmock, "sm80")["servingCacheKey"] == old_key

    await kmock.patch(OM, NS, "digits", {"spec": {"serving": {"maxBatchSize": 16}}})
    rebuild = await eventually(lambda: [j for j in jobs(kmock) if "succeeded" not in j.get("status", {})],
                               what="the rebuild Job")
    await finish_job(kmock, tmp_path, rebuild[0])
    new_key = rebuild[0]["metadata"]["labels"]["optimodel.io/cache-key"]
    dep = await eventually(lambda: deployments(kmock)["sm80"]["metadata"]["annotations"]["optimodel.io/cache-key"]
                           == new_key and deployments(kmock)["sm80"], what="the Deployment on the new engine")

    # mid-surge, as the Deployment controller reports it: the one available pod is the old one
    await kmock.patch_status("apps/v1/deployments", NS, dep["metadata"]["name"],
                             rollout_status(dep, updated=1, available=0, old=1))
    status = kmock.get("apps/v1/deployments", NS, dep["metadata"]["name"])["status"]
    assert (status["replicas"], status["updatedReplicas"], status["availableReplicas"]) == (2, 1, 1)
    await settled(operator)
    assert condition(kmock, "Serving")["status"] == "False"
    assert condition(kmock, "Serving")["reason"] == "RollingOut"
    assert condition(kmock, "Ready")["status"] == "False"
    eng = engine(kmock, "sm80")
    assert eng["state"] == "Ready" and eng["cacheKey"] == new_key
    assert eng["servingCacheKey"] == old_key  # the old pods still answer

    # the new pods never become ready: the controller gives up after progressDeadlineSeconds
    await kmock.patch_status("apps/v1/deployments", NS, dep["metadata"]["name"],
                             rollout_status(dep, updated=1, available=0, old=1, stuck=True))
    serving = await eventually(lambda: condition(kmock, "Serving")["reason"] == "ProgressDeadlineExceeded"
                               and condition(kmock, "Serving"), what="Serving=False ProgressDeadlineExceeded")
    assert serving["status"] == "False" and "timed out progressing" in serving["message"]
    assert condition(kmock, "Ready")["reason"] == "ProgressDeadlineExceeded"
    assert engine(kmock, "sm80")["servingCacheKey"] == old_key

    await make_available(kmock)
    await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready on the new engine")
    assert engine(kmock, "sm80")["servingCacheKey"] == new_key


# ---- 2. the gate's figures reach status ------------------------------------------------------------

async def test_accuracy_arrives_after_the_engine_is_ready_and_is_kept(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model(optimization=GATED))
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    key, name = job["metadata"]["labels"]["optimodel.io/cache-key"], job["metadata"]["name"]
    request = await eventually(lambda: kmock.get("v1/configmaps", NS, name), what="the request ConfigMap")
    uri = json.loads(request["data"]["request.json"])["artifactUri"]
    await start_job(kmock, job)

    # the builder publishes, then its process exits: the store shows the engine first
    publish_engine(tmp_path, uri, key, "sm80")
    await eventually(lambda: engine(kmock, "sm80")["state"] == "Ready", what="Ready from the published artifact")
    result = BuildResult(state="Succeeded", reason="Succeeded", cache_key=key, artifact_uri=uri, accuracy=ACCURACY)
    await terminate_pod(kmock, job, result.line(), 0)
    eng = await eventually(lambda: (engine(kmock, "sm80") or {}).get("accuracy") and engine(kmock, "sm80"),
                           what="accuracy read from the pod's termination message")
    assert eng["accuracy"] == ACCURACY

    await complete_job(kmock, job)  # SuccessCriteriaMet, then Complete
    await settled(operator)
    assert engine(kmock, "sm80")["accuracy"] == ACCURACY
    assert condition(kmock, "AccuracyGatePassed")["status"] == "True"


async def test_accuracy_from_a_pod_that_terminated_before_its_job_completed(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model(optimization=GATED))
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    await finish_job(kmock, tmp_path, job, accuracy=ACCURACY)
    eng = await eventually(lambda: (engine(kmock, "sm80") or {}).get("accuracy") and engine(kmock, "sm80"),
                           what="accuracy in status")
    assert eng["accuracy"] == ACCURACY and eng["state"] == "Ready"
    finished = kmock.get("batch/v1/jobs", NS, job["metadata"]["name"])["status"]
    assert finished["startTime"] and finished["completionTime"]
    assert [c["type"] for c in finished["conditions"]] == ["SuccessCriteriaMet", "Complete"]


# ---- 3. a failure that repeats is not retried ------------------------------------------------------

async def test_deterministic_failure_fails_the_job_without_a_retry(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["containerName"] == "builder"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it

    pods = await finish_job(kmock, tmp_path, job, succeed=False, reason="InvalidModel",
                            message="digits.onnx is not a valid ONNX model")
    assert pods == 1
    assert len(kmock.live("v1/pods", NS)) == 1
    eng = await eventually(lambda: engine(kmock, "sm80")["state"] == "Failed" and engine(kmock, "sm80"))
    assert eng["reason"] == "InvalidModel" and "not a valid ONNX" in eng["message"]
    assert [c["type"] for c in kmock.get("batch/v1/jobs", NS, job["metadata"]["name"])["status"]["conditions"]] \
        == ["FailureTarget", "Failed"]


async def test_transient_failure_is_retried_by_backoff_limit(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    pods = await finish_job(kmock, tmp_path, job, succeed=False, reason="FetchFailed",
                            message="could not fetch file:///models/digits.onnx: timed out")
    assert pods == job["spec"]["backoffLimit"] + 1 == 2
    eng = await eventually(lambda: engine(kmock, "sm80")["state"] == "Failed" and engine(kmock, "sm80"))
    assert eng["reason"] == "FetchFailed"


# ---- request ConfigMaps go with their Jobs --------------------------------------------------------

async def test_request_configmap_is_owned_by_its_job(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    name = job["metadata"]["name"]
    request = await eventually(lambda: kmock.get("v1/configmaps", NS, name), what="the request ConfigMap")
    assert request["metadata"]["ownerReferences"] == [{
        "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
        "controller": True, "blockOwnerDeletion": True}]
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: engine(kmock, "sm80")["state"] == "Ready", what="built")

    # ttlSecondsAfterFinished: the TTL controller deletes the finished Job, the GC its request
    await kmock.remove("batch/v1/jobs", NS, name)
    await eventually(lambda: kmock.get("v1/configmaps", NS, name) is None, what="request ConfigMap collected")
    await settled(operator)
    assert om(kmock) is not None and kmock.count("POST", "jobs") == 1
    assert engine(kmock, "sm80")["state"] == "Ready"


# ---- what a cluster cannot build -------------------------------------------------------------------

async def test_pytorch_entrypoint_without_code_is_refused_at_once(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    source = {**model()["spec"]["model"], "uri": "file:///models/digits_cnn.pt", "format": "pytorch",
              "entrypoint": "digits_cnn:build_model"}
    await kmock.put(OM, model(model=source))
    ready = await eventually(lambda: condition(kmock, "Ready"), what="Ready condition")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpecModelCode"
    assert "spec.model.code" in ready["message"] and "torch-export" in ready["message"]
    await settled(operator)
    assert jobs(kmock) == [] and kmock.count("POST", "jobs") == 0

    await kmock.patch(OM, NS, "digits", {"spec": {"model": {"code": {"uri": "file:///models/digits_cnn.py"}}}})
    job = (await eventually(lambda: jobs(kmock), what="a Job once the code is given"))[0]
    request = await eventually(lambda: kmock.get("v1/configmaps", NS, job["metadata"]["name"]), what="request")
    request = json.loads(request["data"]["request.json"])
    assert request["source"]["code"] == {"uri": "file:///models/digits_cnn.py"}


@pytest.fixture
def cluster_env(operator_env, monkeypatch, tmp_path):
    """The operator as the chart runs it: no OPTIMODEL_ALLOW_FILE_URIS, a pvc:// store."""
    monkeypatch.delenv("OPTIMODEL_ALLOW_FILE_URIS")
    monkeypatch.setenv("OPTIMODEL_STORE_URI", "pvc://optimodel-store/artifacts")
    monkeypatch.setenv("OPTIMODEL_PVC_ROOT", str(tmp_path / "pvc"))
    return operator_env


async def test_file_uris_are_refused_in_a_cluster(kmock, cluster_env, tmp_path):
    async with running_operator() as memo:
        await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
        await kmock.put(OM, model())  # spec.model.uri: file:///models/digits.onnx
        ready = await eventually(lambda: condition(kmock, "Ready"), what="Ready condition")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpecModelUri"
        assert ready["message"].startswith("spec.model.uri: file:///models/digits.onnx") and "pvc://" in ready["message"]
        await settled(memo)
        assert jobs(kmock) == []
        await kmock.patch(OM, NS, "digits", {"spec": {"model": {"uri": "pvc://models/digits.onnx"}}})
        job = (await eventually(lambda: jobs(kmock), what="a Job for a pvc:// model"))[0]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"models", "optimodel-store"}
