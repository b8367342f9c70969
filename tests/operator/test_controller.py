"""The Controller around the pure decisions (issue 9 item 9): one scheduler on the event loop, and no
overlay of recent writes, because deterministic names and server-side apply make a reconcile that runs
before the watch shows its own writes harmless. The scheduler's tests run on looptime's fake clock."""

from __future__ import annotations

import asyncio

import pytest

from optimodel_operator.memory import Memory
from optimodel_operator.scheduler import Scheduler
from optimodel_operator.kube import KubeError

from operator_helpers import (A100, NS, OM, condition, deployments, engine, eventually, finish_job, gpu_node, jobs,
                              model, publish_engine, running_operator)

KEY = ("ml", "digits")


class Work:
    """A reconcile stand-in: records when it ran, answers what the test queued (a delay, None or an error)."""

    def __init__(self, *answers):
        self.answers, self.times, self.running, self.overlaps = list(answers), [], 0, 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, key):
        loop = asyncio.get_running_loop()
        self.times.append(round(loop.time(), 3))
        self.running += 1
        self.overlaps = max(self.overlaps, self.running)
        await self.release.wait()
        self.running -= 1
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.looptime
async def test_triggers_while_a_pass_runs_fold_into_one_more_pass():
    work = Work()
    work.release.clear()
    sched = Scheduler(work, max_backoff=60)
    sched.trigger(KEY)
    await asyncio.sleep(0)
    for _ in range(5):
        sched.trigger(KEY)
    work.release.set()
    await asyncio.sleep(1)
    assert len(work.times) == 2 and work.overlaps == 1 and not sched.running


@pytest.mark.looptime
async def test_triggers_while_waiting_for_a_slot_fold_into_that_pass():
    blocker, work = Work(), Work()
    blocker.release.clear()

    async def either(key):
        return await (blocker if key == ("ml", "busy") else work)(key)

    sched = Scheduler(either, max_backoff=60, concurrency=1)
    sched.trigger(("ml", "busy"))
    await asyncio.sleep(0)
    for _ in range(5):
        sched.trigger(KEY)  # waits for the one slot: every trigger is answered by its first pass
    blocker.release.set()
    await asyncio.sleep(1)
    assert len(work.times) == 1 and not sched.running


@pytest.mark.looptime
async def test_requeue_after_and_the_earliest_due_wins():
    work = Work(30.0, None)
    sched = Scheduler(work, max_backoff=60)
    start = asyncio.get_running_loop().time()
    sched.trigger(KEY)
    await asyncio.sleep(1)
    sched.trigger(KEY, 50.0)  # later than the 30 s already asked for: ignored
    await asyncio.sleep(100)
    assert [round(t - start) for t in work.times] == [0, 30]


@pytest.mark.looptime
async def test_failures_back_off_doubling_up_to_the_cap_then_reset():
    error = KubeError(500, "InternalError", "boom")
    work = Work(error, error, error, error, None, error)
    sched = Scheduler(work, max_backoff=3.0, first_backoff=1.0)
    start = asyncio.get_running_loop().time()
    sched.trigger(KEY)
    await asyncio.sleep(20)
    # 1, 2, then capped at 3; the success resets the count
    assert [round(t - start) for t in work.times[:5]] == [0, 1, 3, 6, 9]
    sched.trigger(KEY)
    await asyncio.sleep(5)
    assert len(work.times) == 7 and round(work.times[-1] - work.times[-2], 3) == 1.0  # 1 s again, not 3
    sched.close()


@pytest.mark.looptime
async def test_a_trigger_now_replaces_a_pending_requeue():
    work = Work(30.0, None)
    sched = Scheduler(work, max_backoff=60)
    start = asyncio.get_running_loop().time()
    sched.trigger(KEY)
    await asyncio.sleep(5)
    sched.trigger(KEY)  # a watch event: look now, and the 30 s timer is dropped
    await asyncio.sleep(100)
    assert [round(t - start) for t in work.times] == [0, 5]
    assert not sched.timers


async def add_node(kmock):
    await kmock.put("v1/nodes", gpu_node("node-a100", *A100[1:]))


def reasons(kmock, reason: str) -> int:
    return [e["reason"] for e in kmock.live("v1/events", NS)].count(reason)


async def test_reconciles_before_the_watch_shows_their_writes_make_no_duplicates(kmock, operator, tmp_path):
    """With the Jobs' watch held back, reconciles see the created Job in the controller's memory; and
    without that memory (dropped here, as after a restart) a second create is answered AlreadyExists
    and read: still one Job, one BuildStarted. The memory saves requests, the names make it safe."""
    gate = kmock.hold_watch("jobs")
    await add_node(kmock)
    await kmock.put(OM, model())
    await eventually(lambda: (condition(kmock, "Built") or {}).get("reason") == "Building", what="Building")
    ctrl = operator.ctrl
    name = jobs(kmock)[0]["metadata"]["name"]
    for _ in range(2):
        before = ctrl.reconciles
        ctrl.trigger(NS, "digits")
        await eventually(lambda: ctrl.reconciles > before, what="another reconcile")
    await asyncio.sleep(0.3)
    assert kmock.count("POST", "jobs") == 1  # remembered: not created again
    for _ in range(2):
        ctrl.memory.watched("Job", NS, "digits", name)  # forgotten
        before = kmock.count("POST", "jobs")
        ctrl.trigger(NS, "digits")
        await eventually(lambda: kmock.count("POST", "jobs") > before, what="another create of the same Job")
    await asyncio.sleep(0.3)
    assert len(jobs(kmock)) == 1 and kmock.count("POST", "jobs") == 3
    assert reasons(kmock, "BuildStarted") == 1 and reasons(kmock, "BuildJobMissing") == 0
    assert engine(kmock, "sm80")["jobName"] == name
    gate.set()
    await eventually(lambda: not ctrl.memory.written("Job", (NS, "digits")), what="the memory let go")
    await finish_job(kmock, tmp_path, jobs(kmock)[0])
    await eventually(lambda: deployments(kmock).get("sm80"), what="the rollout once the watch caught up")
    assert len(jobs(kmock)) == 1 and reasons(kmock, "BuildStarted") == 1


async def test_operator_restarted_before_its_status_write_creates_no_second_job(kmock, operator_env, tmp_path):
    # the first operator creates the Job, then every status write fails: it dies knowing nothing more
    kmock.fail("PATCH", "optimizedmodels", 500, times=10_000, subresource="status", reason="InternalError")
    async with running_operator():
        await add_node(kmock)
        await kmock.put(OM, model())
        await eventually(lambda: jobs(kmock), what="the Job")
        await eventually(lambda: kmock.count("PATCH", "optimizedmodels", "status") >= 5, what="a failed status write")
    kmock._faults.clear()
    assert condition(kmock, "Built") is None
    async with running_operator():
        await eventually(lambda: (condition(kmock, "Built") or {}).get("reason") == "Building", what="status")
        await asyncio.sleep(1.2)  # startup + two resyncs
        assert len(jobs(kmock)) == 1 and kmock.count("POST", "jobs") == 1
        await finish_job(kmock, tmp_path, jobs(kmock)[0])
        await eventually(lambda: deployments(kmock).get("sm80"), what="rollout by the new operator")
    assert kmock.count("POST", "jobs") == 1


async def test_a_conflict_on_apply_is_retried(kmock, operator, tmp_path):
    # 409 on every try of the client's retries: the reconcile fails and the scheduler requeues it
    kmock.fail("PATCH", "deployments", 409, times=6)
    await add_node(kmock)
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="the Job"))[0]
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: deployments(kmock).get("sm80"), timeout=15, what="the Deployment despite 409s")
    assert kmock.count("PATCH", "deployments") >= 7
    assert reasons(kmock, "ApiError") >= 1


async def test_applied_objects_are_not_applied_again_before_the_watch_shows_them(kmock, operator, tmp_path):
    """Deployments are remembered once applied (bench/operator.py: forgetting them doubled every apply
    and every RollingOut event); the memory ends with the watch event of the object."""
    await add_node(kmock)
    await kmock.put(OM, model())
    job = (await eventually(lambda: jobs(kmock), what="the Job"))[0]
    gate = kmock.hold_watch("deployments")
    await finish_job(kmock, tmp_path, job)
    await eventually(lambda: deployments(kmock).get("sm80"), what="the Deployment")
    applies = kmock.count("PATCH", "deployments")
    for _ in range(3):
        before = operator.ctrl.reconciles
        operator.ctrl.trigger(NS, "digits")
        await eventually(lambda: operator.ctrl.reconciles > before, what="another reconcile")
    await asyncio.sleep(0.3)
    assert kmock.count("PATCH", "deployments") == applies == 1
    assert reasons(kmock, "RollingOut") == 1
    gate.set()
    await eventually(lambda: not operator.ctrl.memory.written("Deployment", (NS, "digits")),
                     what="the memory let go once the watch showed the Deployment")


def test_the_operator_finds_pvc_stores_where_its_settings_say(tmp_path, monkeypatch):
    """OPTIMODEL_PVC_ROOT is a setting like the others: the operator's cache-hit check uses Settings.pvc_root,
    not whatever the process environment says."""
    monkeypatch.setenv("OPTIMODEL_PVC_ROOT", str(tmp_path / "elsewhere"))
    publish_engine(tmp_path, f"file://{tmp_path}/pvc/store/ml/digits/k1", "k1", "sm80")
    assert Memory(pvc_root=str(tmp_path / "pvc")).is_published("pvc://store/ml/digits/k1")
    assert not Memory(pvc_root=str(tmp_path / "nothing")).is_published("pvc://store/ml/digits/k1")
