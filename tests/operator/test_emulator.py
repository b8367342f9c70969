"""The emulator says no where a real API server says no: the rules the operator relies on."""

from __future__ import annotations

import aiohttp
import pytest

from kube_emulator import ApiError
from operator_helpers import NS, OM, model

JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": NS},
       "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}}}
MET = {"type": "SuccessCriteriaMet", "status": "True"}
COMPLETE = {"type": "Complete", "status": "True"}


@pytest.mark.parametrize("status, words", [
    # what the operator tests' helpers wrote before issue 13: a real API server refuses it
    ({"succeeded": 1, "conditions": [COMPLETE]}, ["completionTime", "SuccessCriteriaMet", "startTime"]),
    ({"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z", "conditions": [COMPLETE]},
     ["SuccessCriteriaMet"]),
    ({"startTime": "2026-01-01T00:00:00Z", "failed": 2,
      "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}, ["FailureTarget"]),
    ({"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z"}, ["completionTime"]),
    ({"startTime": "2026-01-01T00:00:00Z", "active": 1, "completionTime": "2026-01-01T00:01:00Z",
      "conditions": [MET, COMPLETE]}, ["status.active"]),
])
async def test_job_status_a_real_api_server_refuses(kmock, status, words):
    await kmock.put("batch/v1/jobs", JOB)
    with pytest.raises(ApiError) as err:
        await kmock.patch_status("batch/v1/jobs", NS, "j", status)
    assert err.value.status == 422
    for word in words:
        assert word in err.value.message
    assert "status" not in kmock.get("batch/v1/jobs", NS, "j")


async def test_finished_job_as_the_job_controller_writes_it(kmock):
    await kmock.put("batch/v1/jobs", JOB)
    await kmock.patch_status("batch/v1/jobs", NS, "j", {"startTime": "2026-01-01T00:00:00Z", "active": 1})
    await kmock.patch_status("batch/v1/jobs", NS, "j", {"active": None, "succeeded": 1, "conditions": [MET]})
    done = await kmock.patch_status("batch/v1/jobs", NS, "j", {"completionTime": "2026-01-01T00:01:00Z",
                                                              "conditions": [MET, COMPLETE]})
    assert done["status"]["succeeded"] == 1 and "active" not in done["status"]


async def test_status_only_through_the_subresource_and_generation_only_on_spec(kmock):
    created = await kmock.put(OM, model())
    assert created["metadata"]["generation"] == 1
    same = await kmock.patch(OM, NS, "digits", {"status": {"observedGeneration": 7},
                                                "metadata": {"labels": {"team": "a"}}})
    assert "status" not in same and same["metadata"]["labels"] == {"team": "a"}
    assert same["metadata"]["generation"] == 1  # metadata and status are not spec
    # a write to …/status changes status only, whatever else it carries
    url = f"{str(kmock.url).rstrip('/')}/apis/optimodel.io/v1alpha1/namespaces/{NS}/optimizedmodels/digits/status"
    async with aiohttp.ClientSession() as http:
        async with http.patch(url, json={"spec": {"serving": {"replicas": 9}}, "status": {"observedGeneration": 1}},
                              headers={"Content-Type": "application/merge-patch+json"}) as response:
            assert response.status == 200
            status = await response.json()
    assert status["status"] == {"observedGeneration": 1} and status["spec"] == created["spec"]
    assert status["metadata"]["generation"] == 1
    bumped = await kmock.patch(OM, NS, "digits", {"spec": {"serving": {"replicas": 3}}})
    assert bumped["metadata"]["generation"] == 2 and bumped["status"] == {"observedGeneration": 1}
