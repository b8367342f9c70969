"""Least privilege, derived (issue 9 item 4): the chart's operator ClusterRole grants exactly the
requests the operator makes here, on the emulator's request log, through a lifecycle that takes
every path that talks to the API (build, rollout, failed retry, an architecture leaving, a Secret
check, the peering check, events). Fails both ways: a verb the operator uses that the chart does
not grant (a 403 in a real cluster), and a grant nothing uses."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import helm_python as helm
import pytest

from optimodel_operator.kube import Kube, load_configuration
from optimodel_operator.peering import peering_problem

from operator_helpers import (A100, H100, NS, OM, condition, deployments, eventually, finish_job, gpu_node, jobs,
                              make_available, model)

CHART = Path(__file__).resolve().parents[2] / "charts" / "optimodel"
# What kopf itself does only with peering on (the emulator runs it standalone): it lists and
# watches its peering objects and patches its own entry in them. The one hand-kept part.
KOPF_PEERING = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"},
                ("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}
VERB = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def verbs_of(request) -> set[str]:
    method = request.method.value.upper()
    if request.action is not None and request.action.name == "WATCH":
        return {"watch"}
    if method == "GET" and not request.name:
        return {"list"}
    if method == "DELETE" and not request.name:
        return {"deletecollection"}
    if method == "PATCH" and "apply-patch" in (request.headers.get("Content-Type") or ""):
        # a server-side apply that creates its object is authorized as create as well
        # (kubernetes.io/docs/reference/using-api/api-concepts/#patch-and-apply)
        return {"patch", "create"}
    return {VERB[method]}


def requested(kmock) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource[/subresource]) -> verbs, from the emulator's request log."""
    out: dict[tuple[str, str], set[str]] = {}
    for r in kmock._requests:
        if r.resource is None or r.resource.plural is None or r.method is None:
            continue  # API discovery: every authenticated user may read it
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        out.setdefault((r.resource.group or "", resource), set()).update(verbs_of(r))
    return out


def chart_grants() -> dict[tuple[str, str], set[str]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(None, name="om", namespace="optimodel-system", is_install=True)
    import yaml

    docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    [role] = [d for d in docs if d.get("kind") == "ClusterRole"
              and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


async def lifecycle(kmock, tmp_path) -> None:
    await kmock.put("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS}})
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put("v1/nodes", gpu_node("node-h100", *H100[1:]))
    spec = model()
    spec["spec"]["model"]["credentialsSecret"] = "creds"
    # a create answered AlreadyExists (a Job of that name left by an earlier run): the operator reads it
    kmock.fail("POST", "jobs", status=409, reason="AlreadyExists", times=1)
    await kmock.put(OM, spec)
    built = await eventually(lambda: len(jobs(kmock)) == 2 and jobs(kmock), what="two Jobs")
    sm80 = next(j for j in built if j["metadata"]["labels"]["optimodel.io/arch"] == "sm80")
    await finish_job(kmock, tmp_path, sm80)
    await eventually(lambda: deployments(kmock).get("sm80"), what="the sm80 Deployment")
    await make_available(kmock)
    await kmock.remove("v1/nodes", None, "node-h100")  # its build is stopped (DELETE)
    await eventually(lambda: len([j for j in jobs(kmock) if "succeeded" not in j.get("status", {})]) == 0,
                     what="the sm90 build stopped")
    await kmock.remove("v1/nodes", None, "node-a100")  # its Deployment scaled to 0 (PATCH)
    await eventually(lambda: deployments(kmock)["sm80"]["spec"]["replicas"] == 0, what="scaled to 0")
    await eventually(lambda: condition(kmock, "Serving"), what="status written")
    kube = await asyncio.to_thread(lambda: Kube(load_configuration(os.environ["KUBECONFIG"])))
    try:
        # the start's peering check (GET), cluster-wide and per watched namespace
        await asyncio.to_thread(peering_problem, kube, "optimodel", ())
        await asyncio.to_thread(peering_problem, kube, "optimodel", (NS,))
    finally:
        kube.close()


@pytest.mark.slow
async def test_chart_grants_exactly_what_the_operator_requests(kmock, operator, tmp_path):
    await lifecycle(kmock, tmp_path)
    used = requested(kmock)
    for key, verbs in KOPF_PEERING.items():
        used.setdefault(key, set()).update(verbs)
    missing, unused = compare(used, chart_grants())
    assert missing == {}, f"the operator makes requests the chart does not grant (403 in a cluster): {missing}"
    assert unused == {}, f"the chart grants what nothing uses: {unused}"


def compare(used: dict, grants: dict) -> tuple[dict, dict]:
    """(used but not granted, granted but not used), each (group, resource) -> sorted verbs."""
    missing = {k: sorted(v - grants.get(k, set())) for k, v in used.items() if v - grants.get(k, set())}
    unused = {k: sorted(v - used.get(k, set())) for k, v in grants.items() if v - used.get(k, set())}
    return missing, unused


def test_the_comparison_fails_both_ways():
    used = {("", "pods"): {"list", "watch"}, ("batch", "jobs"): {"create"}}
    assert compare(used, used) == ({}, {})
    assert compare(used, {("", "pods"): {"list", "watch"}}) == ({("batch", "jobs"): ["create"]}, {})
    assert compare(used, {**used, ("", "pods"): {"list", "watch", "update"}}) == ({}, {("", "pods"): ["update"]})
