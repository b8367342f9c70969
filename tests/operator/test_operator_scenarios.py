"""kopf against the emulated API server over HTTP: the issue's scenarios end to end."""

from __future__ import annotations

import asyncio

import pytest

from operator_helpers import (A100, H100, L4, NS, OM, condition, deployments, engine, eventually,
                                     finish_job, gpu_node, jobs, make_available, model, om, running_operator)




async def add_nodes(kmock, *kinds):
    for name, major, minor, product in kinds:
        await kmock.put("v1/nodes", gpu_node(f"node-{name}", major, minor, product))


async def test_create_builds_per_arch_then_rolls_out(kmock, operator, tmp_path):
    await add_nodes(kmock, A100, H100)
    await kmock.put(OM, model())

    built = await eventually(lambda: len(jobs(kmock)) == 2 and jobs(kmock), what="two builder Jobs")
    assert sorted(j["metadata"]["labels"]["optimodel.io/arch"] for j in built) == ["sm80", "sm90"]
    sm90 = next(j for j in built if j["metadata"]["labels"]["optimodel.io/arch"] == "sm90")
    pod = sm90["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert sm90["metadata"]["ownerReferences"][0]["uid"] == om(kmock)["metadata"]["uid"]
    await eventually(lambda: condition(kmock, "Built")["reason"] == "Building", what="Built=Building")
    assert deployments(kmock) == {}

    for job in built:
        await finish_job(kmock, tmp_path, job)
    await eventually(lambda: len(deployments(kmock)) == 2, what="two Deployments")
    await eventually(lambda: kmock.get("v1/services", NS, "digits"), what="Service")
    cm = await eventually(lambda: kmock.get("v1/configmaps", NS, "digits-batching"), what="batching ConfigMap")
    assert '"maxBatchSize": 32' in cm["data"]["batching.json"]
    await eventually(lambda: condition(kmock, "Built")["status"] == "True", what="Built=True")
    assert condition(kmock, "Ready")["status"] == "False"  # pods not available yet
    assert condition(kmock, "Ready")["reason"] == "RollingOut"

    await make_available(kmock)
    ready = await eventually(lambda: condition(kmock, "Ready")["status"] == "True" and condition(kmock, "Ready"),
                             what="Ready=True")
    status = om(kmock)["status"]
    assert ready["observedGeneration"] == om(kmock)["metadata"]["generation"] == status["observedGeneration"]
    assert {e["arch"]: e["state"] for e in status["engines"]} == {"sm80": "Ready", "sm90": "Ready"}
    assert status["serving"]["endpoint"] == f"http://digits.{NS}.svc:8080"
    dep = deployments(kmock)["sm90"]
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--artifact") + 1] == engine(kmock, "sm90")["artifactUri"]
    assert kmock.count("POST", "jobs") == 2


async def serving_on(kmock, tmp_path, *kinds, name="digits", **spec):
    """Nodes of these kinds, a model built and available on them."""
    await add_nodes(kmock, *kinds)
    await kmock.put(OM, model(name, **spec))
    built = await eventually(lambda: len(jobs(kmock, name)) == len(kinds) and jobs(kmock, name), what="Jobs")
    for job in built:
        await finish_job(kmock, tmp_path, job)
    await eventually(lambda: len(deployments(kmock, name)) == len(kinds), what="Deployments")
    await make_available(kmock, name)
    await eventually(lambda: condition(kmock, "Ready", name)["status"] == "True", what="Ready")


def artifact_of(dep: dict) -> str:
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    return cmd[cmd.index("--artifact") + 1]


async def test_gate_failure_keeps_previous_engine_serving(kmock, operator, tmp_path):
    await serving_on(kmock, tmp_path, A100)
    old_artifact = artifact_of(deployments(kmock)["sm80"])

    spec = om(kmock)["spec"]
    optimization = {"precision": "int8", "calibration": {"datasetUri": "file:///data/calib.npz"},
                    "accuracyGate": {"datasetUri": "file:///data/gate.npz", "maxDrop": 0.001}}
    await kmock.patch(OM, NS, "digits", {"spec": {"optimization": optimization}})
    rebuild = await eventually(lambda: len(jobs(kmock)) == 2 and [
        j for j in jobs(kmock) if "succeeded" not in j.get("status", {})], what="a rebuild Job")
    await finish_job(kmock, tmp_path, rebuild[0], succeed=False, reason="AccuracyGateFailed",
                     message="top1-agreement dropped 0.031 > 0.001",
                     accuracy={"metric": "top1-agreement", "original": 1.0, "optimized": 0.969, "drop": 0.031})

    gate = await eventually(lambda: condition(kmock, "AccuracyGatePassed")["status"] == "False"
                            and condition(kmock, "AccuracyGatePassed"), what="gate condition")
    assert gate["reason"] == "AccuracyGateFailed" and "0.031" in gate["message"]
    eng = engine(kmock, "sm80")
    assert eng["state"] == "Failed" and eng["reason"] == "AccuracyGateFailed" and eng["accuracy"]["drop"] == 0.031
    # status tells which engine still serves: the old one, not the rejected key
    assert eng["servingCacheKey"] and eng["servingCacheKey"] != eng["cacheKey"]
    assert eng["servingCacheKey"] in old_artifact
    assert condition(kmock, "Ready")["reason"] == "AccuracyGateFailed"
    assert condition(kmock, "Serving")["status"] == "True"
    assert artifact_of(deployments(kmock)["sm80"]) == old_artifact
    posts = kmock.count("POST", "jobs")
    await asyncio.sleep(1.5)  # three resyncs: a failed key is not retried
    assert kmock.count("POST", "jobs") == posts
    assert artifact_of(deployments(kmock)["sm80"]) == old_artifact
    reasons = {e["reason"] for e in kmock.live("v1/events", NS)}
    assert {"BuildStarted", "BuildSucceeded", "AccuracyGateFailed"} <= reasons


async def test_new_gpu_architecture_gets_build_and_rollout(kmock, operator, tmp_path):
    await serving_on(kmock, tmp_path, A100)
    await add_nodes(kmock, H100)
    new = await eventually(lambda: [j for j in jobs(kmock) if j["metadata"]["labels"]["optimodel.io/arch"] == "sm90"],
                           what="sm90 Job")
    assert condition(kmock, "Built")["reason"] == "Building"
    assert condition(kmock, "Serving")["status"] == "True"  # sm80 keeps serving meanwhile
    await finish_job(kmock, tmp_path, new[0])
    await eventually(lambda: "sm90" in deployments(kmock), what="sm90 Deployment")
    await make_available(kmock)
    await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready again")
    assert kmock.count("POST", "jobs") == 2


async def test_architecture_leaving_scales_its_deployment_to_zero(kmock, operator, tmp_path):
    await serving_on(kmock, tmp_path, A100, H100)
    await kmock.patch_status("v1/nodes", None, "node-h100", {"conditions": [{"type": "Ready", "status": "False"}]})
    await eventually(lambda: deployments(kmock)["sm90"]["spec"]["replicas"] == 0, what="sm90 scaled to 0")
    assert deployments(kmock)["sm80"]["spec"]["replicas"] == 2
    eng = await eventually(lambda: engine(kmock, "sm90")["state"] == "Removed" and engine(kmock, "sm90"))
    assert eng["reason"] == "ArchitectureGone" and eng["cacheKey"]
    await eventually(lambda: condition(kmock, "Ready")["status"] == "True", what="Ready on the remaining arch")

    # it comes back: the cached engine serves again without a build
    await kmock.patch_status("v1/nodes", None, "node-h100", {"conditions": [{"type": "Ready", "status": "True"}]})
    await eventually(lambda: deployments(kmock)["sm90"]["spec"]["replicas"] == 2, what="sm90 scaled back")
    assert kmock.count("POST", "jobs") == 2


async def test_node_removed_mid_build_stops_the_build(kmock, operator, tmp_path):
    await add_nodes(kmock, A100, H100)
    await kmock.put(OM, model())
    await eventually(lambda: len(jobs(kmock)) == 2, what="two Jobs")
    await kmock.remove("v1/nodes", None, "node-h100")
    await eventually(lambda: len(jobs(kmock)) == 1, what="the sm90 Job deleted")
    assert jobs(kmock)[0]["metadata"]["labels"]["optimodel.io/arch"] == "sm80"
    eng = await eventually(lambda: engine(kmock, "sm90")["state"] == "Removed" and engine(kmock, "sm90"))
    assert "no schedulable nodes" in eng["message"]
    assert "BuildStopped" in {e["reason"] for e in kmock.live("v1/events", NS)}


async def test_serving_only_change_updates_deployment_without_build(kmock, operator, tmp_path):
    await serving_on(kmock, tmp_path, A100)
    artifact = artifact_of(deployments(kmock)["sm80"])
    await kmock.patch(OM, NS, "digits", {"spec": {"serving": {"replicas": 5, "batching": {"maxWaitMs": 7.5},
                                                              "resources": {"limits": {"memory": "4Gi"}}}}})
    await eventually(lambda: deployments(kmock)["sm80"]["spec"]["replicas"] == 5, what="5 replicas")
    dep = deployments(kmock)["sm80"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "4Gi"
    assert artifact_of(dep) == artifact
    await eventually(lambda: '"maxWaitMs": 7.5' in kmock.get("v1/configmaps", NS, "digits-batching")["data"]["batching.json"],
                     what="ConfigMap updated")
    await eventually(lambda: om(kmock)["status"]["observedGeneration"] == om(kmock)["metadata"]["generation"] == 2)
    assert kmock.count("POST", "jobs") == 1
    assert om(kmock)["status"]["serving"]["maxWaitMs"] == 7.5
    assert condition(kmock, "Ready")["reason"] == "RollingOut"  # the new replicas are not up yet


async def test_delete_removes_children(kmock, operator, tmp_path):
    await serving_on(kmock, tmp_path, A100)
    uid = om(kmock)["metadata"]["uid"]
    children = [o for kind in ("batch/v1/jobs", "apps/v1/deployments", "v1/services", "v1/configmaps")
                for o in kmock.live(kind, NS)]
    # build requests are owned by their Job, which the model owns
    owners = {uid} | {j["metadata"]["uid"] for j in kmock.live("batch/v1/jobs", NS)}
    assert len(children) >= 5 and all(o["metadata"]["ownerReferences"][0]["uid"] in owners for o in children)
    assert "finalizers" not in om(kmock)["metadata"]  # nothing blocks the deletion
    await kmock.remove(OM, NS, "digits")
    await eventually(lambda: not any(kmock.live(k, NS) for k in
                                     ("batch/v1/jobs", "apps/v1/deployments", "v1/services", "v1/configmaps")),
                     what="children garbage-collected")
    await asyncio.sleep(1)  # a resync after the deletion recreates nothing
    assert not kmock.live("apps/v1/deployments", NS)
    # and the operator lets go of what it kept for the model (a long-lived process would grow otherwise)
    ctrl = operator.ctrl
    assert not ctrl.memory.holds((NS, "digits"), uid)
    assert uid not in ctrl.seen_generation and (NS, "digits") not in ctrl.scheduler.failures


async def test_restart_mid_build_resumes_without_duplicates(kmock, operator_env, tmp_path):
    async with running_operator():
        await add_nodes(kmock, A100, H100)
        await kmock.put(OM, model())
        await eventually(lambda: len(jobs(kmock)) == 2, what="two Jobs")
        await eventually(lambda: condition(kmock, "Built")["reason"] == "Building")
    posts = kmock.count("POST", "jobs")
    async with running_operator():
        await asyncio.sleep(1.2)  # startup + two resyncs
        assert kmock.count("POST", "jobs") == posts == 2
        for job in jobs(kmock):
            await finish_job(kmock, tmp_path, job)
        await eventually(lambda: len(deployments(kmock)) == 2, what="rollout by the new operator")
    assert kmock.count("POST", "jobs") == 2


async def test_invalid_spec_is_reported_by_field_and_builds_nothing(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    bad = model()
    bad["spec"]["serving"]["maxBatchSize"] = 100000
    await kmock.put(OM, bad)
    ready = await eventually(lambda: condition(kmock, "Ready"), what="Ready condition")
    assert ready["status"] == "False"
    assert ready["reason"] == "InvalidSpecServingMaxBatchSize"
    assert "spec.serving.maxBatchSize" in ready["message"]
    await asyncio.sleep(1)
    assert jobs(kmock) == [] and kmock.count("POST", "jobs") == 0
    # fixing the spec heals it
    await kmock.patch(OM, NS, "digits", {"spec": {"serving": {"maxBatchSize": 64}}})
    await eventually(lambda: len(jobs(kmock)) == 1, what="a Job once the spec is valid")


async def test_missing_secret_waits_then_builds(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    spec = model()
    spec["spec"]["model"]["credentialsSecret"] = "s3-creds"
    await kmock.put(OM, spec)
    built = await eventually(lambda: condition(kmock, "Built")["reason"] == "SecretMissing" and condition(kmock, "Built"))
    assert "s3-creds" in built["message"] and jobs(kmock) == []
    await kmock.put("v1/secrets", {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": "s3-creds", "namespace": NS}, "data": {}})
    job = (await eventually(lambda: jobs(kmock), what="Job once the Secret exists"))[0]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": False}}]


async def test_builder_image_pull_failure_is_reported(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock)))[0]
    await kmock.put("v1/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": job["metadata"]["name"] + "-p", "namespace": NS,
        "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "builder", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": "Back-off pulling image registry.test/builder:1"}}}]}})
    built = await eventually(lambda: condition(kmock, "Built")["reason"] == "BuilderImagePullFailed"
                             and condition(kmock, "Built"))
    assert "registry.test/builder:1" in built["message"]
    assert condition(kmock, "Ready")["reason"] == "BuilderImagePullFailed"


async def test_job_deleted_by_hand_is_recreated(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock)))[0]
    await eventually(lambda: engine(kmock, "sm80")["jobName"] == job["metadata"]["name"])
    await kmock.remove("batch/v1/jobs", NS, job["metadata"]["name"])
    again = await eventually(lambda: kmock.count("POST", "jobs") == 2 and jobs(kmock), what="Job recreated")
    assert again[0]["metadata"]["name"] == job["metadata"]["name"]
    # events are posted after the create and the status write
    await eventually(lambda: "BuildJobMissing" in {e["reason"] for e in kmock.live("v1/events", NS)},
                     what="the BuildJobMissing event")


async def test_conflicts_are_retried(kmock, operator, tmp_path):
    kmock.fail("PATCH", "optimizedmodels", 409, times=2, subresource="status")
    await add_nodes(kmock, A100)
    await kmock.put(OM, model())
    await eventually(lambda: condition(kmock, "Built")["reason"] == "Building", what="status despite 409s")
    assert kmock.count("PATCH", "optimizedmodels", "status") >= 3


async def test_cache_hit_rolls_out_without_a_job(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock)))[0]
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: deployments(kmock), what="first model rolled out")
    # a second model with the same name in another store path would rebuild; the same model recreated does not
    await kmock.remove(OM, NS, "digits")
    await eventually(lambda: not jobs(kmock))
    await eventually(lambda: not operator.ctrl.indexes["job_index"].get((NS, "digits")), what="operator saw it go")
    await kmock.put(OM, model())
    await eventually(lambda: deployments(kmock), what="rolled out from the cache")
    await eventually(lambda: engine(kmock, "sm80")["reason"] == "CacheHit", what="engine from the cache")
    assert kmock.count("POST", "jobs") == 1


async def test_explicit_architectures_and_cpu_fallback(kmock, operator, tmp_path):
    await add_nodes(kmock, A100)
    await kmock.put(OM, model("pinned", targets={"gpuArchitectures": ["sm90"]}))
    eng = await eventually(lambda: engine(kmock, "sm90", "pinned"))
    assert eng["state"] == "Pending" and eng["reason"] == "NoNodes"
    assert condition(kmock, "Built", "pinned")["reason"] == "NoTargets"
    await kmock.put(OM, model("both", targets={"gpuArchitectures": ["sm80"], "cpu": True}))
    both = await eventually(lambda: len(jobs(kmock, "both")) == 2 and jobs(kmock, "both"))
    cpu = next(j for j in both if j["metadata"]["labels"]["optimodel.io/arch"] == "cpu")
    pod = cpu["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert jobs(kmock, "pinned") == []
