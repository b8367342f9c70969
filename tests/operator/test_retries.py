"""Retries (issue 9 item 2): the rebuild annotation, transient vs deterministic build failures,
and requeue with backoff after an API error."""

from __future__ import annotations

import asyncio

from optimodel.build import BuildResult
from optimodel_operator import render
from optimodel_operator.reconcile import CreateJob, JobView, Observed, PodView, decide
from optimodel_operator.settings import Settings

from operator_helpers import (A100, NS, OM, TOOLCHAIN, engine, eventually, finish_job, gpu_node, jobs, model,
                              running_operator)

SETTINGS = Settings(store_uri="file:///store", toolchain=TOOLCHAIN, allow_file_uris=True,
                    build_retries=2, build_retry_seconds=30)
REF = render.ModelRef(namespace="ml", name="digits", uid="uid-1")
T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:31Z", "2026-01-01T00:10:00Z"


def step(status=None, jobs_=(), now=T0, rebuild=None, results=None):
    observed = Observed(jobs={j.name: j for j in jobs_},
                        pods={name: [PodView(name=f"{name}-p", job=name, terminated_message=line)]
                              for name, line in (results or {}).items()})
    from optimodel.target import CPU  # noqa: F401  (the fleet is GPU only here)
    from optimodel_operator.discovery import node_target
    return decide(model=REF, raw_spec=model()["spec"], generation=1, status=status,
                  fleet={"sm80": node_target(gpu_node(*A100))}, observed=observed, settings=SETTINGS,
                  published=lambda uri: False, secret_exists=lambda name: True, now=now, rebuild=rebuild)


def failed(reason: str, decision, state="Failed", job_reason="PodFailurePolicy"):
    """The world after the decision's Job failed with this builder result."""
    create = [a for a in decision.actions if isinstance(a, CreateJob)][0]
    line = BuildResult(state="Failed", reason=reason, cache_key=create.cache_key, message="x").line()
    return [JobView(create.name, "sm80", create.cache_key, state, job_reason, "m")], {create.name: line}, create


def test_transient_failure_is_retried_with_backoff_then_given_up():
    first = step()
    jobs_, results, create = failed("FetchFailed", first)
    waiting = step(first.status, jobs_, T0, results=results)
    eng = waiting.patch["engines"][0]
    assert eng["state"] == "Failed" and eng["retryAt"] == "2026-01-01T00:00:30.000Z"
    assert waiting.requeue_after == 30 and not waiting.actions
    retry = step(waiting.status, jobs_, T1, results=results)
    (again,) = [a for a in retry.actions if isinstance(a, CreateJob)]
    assert again.name == create.name + "-r1" and again.cache_key == create.cache_key
    assert retry.patch["engines"][0]["retries"] == 1
    assert "BuildRetried" in {e.reason for e in retry.all_events()}
    # the second failure waits twice as long, the third is the last
    jobs2, results2, _ = failed("FetchFailed", retry)
    wait2 = step(retry.status, jobs_ + jobs2, T1, results={**results, **results2})
    assert wait2.requeue_after == 60
    retry2 = step(wait2.status, jobs_ + jobs2, T2, results={**results, **results2})
    jobs3, results3, _ = failed("FetchFailed", retry2)
    done = step(retry2.status, jobs_ + jobs2 + jobs3, T2, results={**results, **results2, **results3})
    assert done.requeue_after is None and not done.actions
    assert done.patch["engines"][0]["retries"] == 2 and "retryAt" not in done.patch["engines"][0]


def test_pods_that_died_without_a_result_are_transient():
    first = step()
    create = [a for a in first.actions if isinstance(a, CreateJob)][0]
    evicted = [JobView(create.name, "sm80", create.cache_key, "Failed", "BackoffLimitExceeded", "evicted")]
    assert step(first.status, evicted).requeue_after == 30


def test_deterministic_failure_is_never_retried_automatically():
    first = step()
    jobs_, results, _ = failed("AccuracyGateFailed", first)
    later = step(step(first.status, jobs_, results=results).status, jobs_, T2, results=results)
    assert later.requeue_after is None and not later.actions
    assert "retryAt" not in later.patch["engines"][0]


def test_rebuild_annotation_retries_once_per_new_value():
    first = step()
    jobs_, results, create = failed("InvalidModel", first)
    stopped = step(first.status, jobs_, results=results)
    retry = step(stopped.status, jobs_, rebuild="1", results=results)
    (again,) = [a for a in retry.actions if isinstance(a, CreateJob)]
    assert again.name == create.name + "-r1"
    assert retry.patch["engines"][0]["rebuild"] == "1"
    jobs2, results2, _ = failed("InvalidModel", retry)
    world = dict(results=({**results, **results2}))
    failed_again = step(retry.status, jobs_ + jobs2, rebuild="1", **world)
    assert not failed_again.actions  # the same value does not retry twice
    assert not step(failed_again.status, jobs_ + jobs2, rebuild="1", **world).actions
    (third,) = [a for a in step(failed_again.status, jobs_ + jobs2, rebuild="2", **world).actions
                if isinstance(a, CreateJob)]
    assert third.name == create.name + "-r2"


# ---- against the API server -------------------------------------------------------------------------

async def test_rebuild_annotation_starts_a_new_job_for_the_failed_key(kmock, operator, tmp_path):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
    await finish_job(kmock, tmp_path, job, succeed=False, reason="InvalidModel", message="not ONNX")
    await eventually(lambda: engine(kmock, "sm80")["state"] == "Failed", what="the failed engine")
    await kmock.patch(OM, NS, "digits", {"metadata": {"annotations": {"optimodel.io/rebuild": "2026-01-01"}}})
    retry = await eventually(lambda: [j for j in jobs(kmock) if j["metadata"]["name"].endswith("-r1")],
                             what="the retry Job")
    assert retry[0]["metadata"]["labels"]["optimodel.io/cache-key"] == job["metadata"]["labels"]["optimodel.io/cache-key"]
    await finish_job(kmock, tmp_path, retry[0])
    await eventually(lambda: engine(kmock, "sm80")["state"] == "Ready", what="the rebuilt engine")
    assert engine(kmock, "sm80")["rebuild"] == "2026-01-01"


async def test_transient_failure_gets_a_new_job_after_backoff(kmock, operator_env, monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMODEL_BUILD_RETRY_SECONDS", "0.3")
    monkeypatch.setenv("OPTIMODEL_RESYNC_SECONDS", "3600")  # the requeue, not the resync, brings the retry
    async with running_operator():
        await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
        await kmock.put(OM, model())
        job = (await eventually(lambda: jobs(kmock), what="a Job"))[0]
        await finish_job(kmock, tmp_path, job, succeed=False, reason="FetchFailed", message="store timed out")
        retry = await eventually(lambda: [j for j in jobs(kmock) if j["metadata"]["name"].endswith("-r1")],
                                 what="the retry Job")
        await finish_job(kmock, tmp_path, retry[0])
        eng = await eventually(lambda: engine(kmock, "sm80")["state"] == "Ready" and engine(kmock, "sm80"))
        assert eng["retries"] == 1


async def test_api_error_is_requeued_with_backoff_not_left_to_the_resync(kmock, operator_env, monkeypatch):
    monkeypatch.setenv("OPTIMODEL_RESYNC_SECONDS", "3600")
    # 403 is not retried by the client: the reconcile fails, and only a requeue brings the Job
    kmock.fail("POST", "jobs", status=403, times=2, reason="Forbidden", message="jobs.batch is forbidden")
    async with running_operator():
        await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))
        await kmock.put(OM, model())
        await eventually(lambda: jobs(kmock), timeout=8, what="the Job after two refused creates")
        assert kmock.count("POST", "jobs") == 3
        reasons = [e["reason"] for e in kmock.live("v1/events", NS)]
        assert reasons.count("ApiError") >= 2
