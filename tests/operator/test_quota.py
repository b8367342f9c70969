"""Self-service in quota'd namespaces (issue 9 item 7): requests and limits on every pod the
operator creates, and a ResourceQuota's refusal as a QuotaExceeded condition with its message."""

from __future__ import annotations

from optimodel.spec import OptimizedModelSpec
from optimodel_operator import render
from optimodel_operator.settings import Settings

from operator_helpers import (A100, NS, OM, TOOLCHAIN, condition, deployments, engine, eventually, finish_job,
                              gpu_node, jobs, model)

QUOTA = ('jobs.batch "digits-build-sm80-x" is forbidden: exceeded quota: ml-quota, requested: count/jobs.batch=1, '
         'used: count/jobs.batch=4, limited: count/jobs.batch=4')
POD_QUOTA = ('pods "digits-sm80-7d9c-x" is forbidden: exceeded quota: ml-quota, requested: limits.memory=2Gi, '
             'used: limits.memory=7Gi, limited: limits.memory=8Gi')


def _containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def test_every_pod_the_operator_creates_has_cpu_and_memory_requests_and_limits():
    settings = Settings(store_uri="file:///s", toolchain=TOOLCHAIN, allow_file_uris=True,
                        builder_resources={"requests": {"cpu": "2", "memory": "8Gi"}})
    ref = render.ModelRef("ml", "digits", "uid")
    spec = OptimizedModelSpec.model_validate(model()["spec"])
    owned = {"serving": {**model()["spec"]["serving"], "resources": {"limits": {"cpu": "3", "memory": "3Gi"}}}}
    specs = [spec, OptimizedModelSpec.model_validate({**model()["spec"], **owned})]
    for target in (settings.cpu_target, render.Target(arch="sm80")):
        pods = [render.builder_job(ref, spec, target, "k" * 32, "j", settings)]
        pods += [render.deployment(ref, s, target, "file:///s/x", "k" * 32, settings) for s in specs]
        for obj in pods:
            for c in _containers(obj):
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][part]), (obj["kind"], c["resources"])
    builder = _containers(render.builder_job(ref, spec, settings.cpu_target, "k" * 32, "j", settings))[0]
    assert builder["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}  # a missing limit is its request
    owned_dep = render.deployment(ref, specs[1], settings.cpu_target, "file:///s/x", "k" * 32, settings)
    assert _containers(owned_dep)[0]["resources"]["requests"] == {"cpu": "3", "memory": "3Gi"}


async def test_a_quota_refusing_the_job_is_a_clear_condition_then_the_build_goes_on(kmock, operator, tmp_path):
    kmock.fail("POST", "jobs", status=403, times=3, reason="Forbidden", message=QUOTA)
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    built = await eventually(lambda: condition(kmock, "Built")["reason"] == "QuotaExceeded"
                             and condition(kmock, "Built"), what="Built=False QuotaExceeded")
    assert built["status"] == "False" and "exceeded quota: ml-quota" in built["message"]
    assert engine(kmock, "sm80")["state"] == "Pending" and engine(kmock, "sm80")["reason"] == "QuotaExceeded"
    assert condition(kmock, "Ready")["reason"] == "QuotaExceeded"
    await eventually(lambda: "QuotaExceeded" in {e["reason"] for e in kmock.live("v1/events", NS)})
    # room again (the fault answered its three refusals): the requeue creates the Job
    await eventually(lambda: jobs(kmock), what="the Job once the quota allows it")
    await eventually(lambda: condition(kmock, "Built")["reason"] == "Building", what="Building again")


async def test_a_quota_refusing_the_servers_pods_is_a_clear_condition(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    await finish_job(kmock, tmp_path, job)
    dep = await eventually(lambda: deployments(kmock).get("sm80"), what="the Deployment")
    # the ReplicaSet controller could not create a pod: the Deployment says so in ReplicaFailure
    await kmock.patch_status("apps/v1/deployments", NS, dep["metadata"]["name"], {
        "observedGeneration": dep["metadata"]["generation"], "replicas": 0, "updatedReplicas": 0,
        "conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                        "message": POD_QUOTA}]})
    serving = await eventually(lambda: condition(kmock, "Serving")["reason"] == "QuotaExceeded"
                               and condition(kmock, "Serving"), what="Serving=False QuotaExceeded")
    assert serving["status"] == "False" and "limits.memory" in serving["message"]
