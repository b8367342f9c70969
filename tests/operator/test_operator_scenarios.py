"""kopf against the emulated API server over HTTP: the issue's scenarios end to end."""

from __future__ import annotations

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
    assert condition(kmock, "Built")["status"] == "True"
    assert condition(kmock, "Ready")["status"] == "False"  # pods not available yet

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
