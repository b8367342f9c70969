"""The reconcile's numbered steps one by one (issue 9 item 8): each a pure function over the contract's
typed status (EngineStatus, Condition), turned into camelCase only by Decision.patch."""

from __future__ import annotations

from optimodel.spec import EngineStatus, OptimizedModelSpec
from optimodel.target import Target
from optimodel_operator import reconcile, render
from optimodel_operator import status as cond
from optimodel_operator.reconcile import DeploymentView, JobView, Observed, PodView
from optimodel_operator.settings import Settings

from operator_helpers import TOOLCHAIN, model

SETTINGS = Settings(store_uri="file:///store", toolchain=TOOLCHAIN, allow_file_uris=True)
REF = render.ModelRef(namespace="ml", name="digits", uid="uid-1")
SM80 = Target(arch="sm80", product="NVIDIA-A100-SXM4-80GB")
SM90 = Target(arch="sm90", product="NVIDIA-H100-80GB-HBM3")
NOW = "2026-01-01T00:00:00Z"
KEY = "k" * 32
SPEC = OptimizedModelSpec.model_validate(model()["spec"])


def step(old=None, tries=None, **kw):
    args = dict(model=REF, spec=SPEC, settings=SETTINGS, observed=Observed(), generation=1,
                published=lambda uri: False, secret_exists=lambda name: True, rebuild=None, now=NOW)
    args.update(kw)
    return reconcile.engine_step("sm80", SM80, KEY, tries or reconcile.Tries(), old, **args)


# ---- 1. engine state per architecture ---------------------------------------------------------

def test_engine_step_starts_a_build_or_reuses_a_published_engine():
    new = step()
    assert isinstance(new.engine, EngineStatus)
    assert (new.engine.state, new.engine.job_name) == ("Building", new.actions[0].name)
    assert [type(a).__name__ for a in new.actions] == ["CreateJob"]
    assert [e.reason for e in new.actions[0].announce] == ["BuildStarted"] and not new.events
    hit = step(published=lambda uri: True)
    assert (hit.engine.state, hit.engine.reason, hit.actions) == ("Ready", "CacheHit", [])
    assert [e.reason for e in hit.events] == ["CacheHit"]


def test_engine_step_follows_its_job():
    jname = step().actions[0].name
    building = Observed(jobs={jname: JobView(jname, "sm80", KEY, "Active")})
    running = step(observed=building)
    assert (running.engine.state, running.engine.reason, running.actions) == ("Building", "Building", [])
    done = Observed(jobs={jname: JobView(jname, "sm80", KEY, "Succeeded")})
    ready = step(observed=done, published=lambda uri: True)
    assert (ready.engine.state, ready.engine.reason) == ("Ready", "Succeeded")
    lost = step(observed=done)  # succeeded, but the store shows no manifest: transient, retried later
    assert (lost.engine.state, lost.engine.reason) == ("Failed", "ArtifactMissing")
    assert lost.engine.retry_at and lost.requeue_after == SETTINGS.build_retry_seconds
    pull = Observed(jobs=building.jobs, pods={jname: [PodView("p", jname, waiting_reason="ImagePullBackOff",
                                                               waiting_message="no such image")]})
    stuck = step(observed=pull)
    assert stuck.engine.reason == "BuilderImagePullFailed" and SETTINGS.builder_image in stuck.engine.message


def test_engine_step_keeps_a_ready_engine_and_a_deterministic_failure():
    ready = EngineStatus(arch="sm80", state="Ready", cache_key=KEY, artifact_uri="file:///store/x")
    kept = step(old=ready)
    assert kept.engine == ready and not kept.actions and not kept.events
    failed = EngineStatus(arch="sm80", state="Failed", cache_key=KEY, reason="AccuracyGateFailed", message="drop")
    again = step(old=failed)
    assert again.engine == failed and not again.actions and again.requeue_after is None
    other_key = step(old=failed.model_copy(update={"cache_key": "o" * 32}))  # the spec changed the key
    assert other_key.engine.state == "Building" and other_key.actions


def test_engine_step_waits_for_a_secret_and_reports_a_quota():
    secret_spec = OptimizedModelSpec.model_validate(
        {**model()["spec"], "model": {**model()["spec"]["model"], "credentialsSecret": "creds"}})
    waiting = step(spec=secret_spec, secret_exists=lambda name: False)
    assert waiting.engine.reason == "SecretMissing" and not waiting.actions
    assert [e.reason for e in waiting.events] == ["SecretMissing"]
    jname = step().actions[0].name
    quota = step(observed=Observed(refused={jname: "exceeded quota: q"}))
    assert (quota.engine.state, quota.engine.reason) == ("Pending", "QuotaExceeded")
    assert [type(a).__name__ for a in quota.actions] == ["CreateJob"]  # and it tries again
    said = step(old=quota.engine, observed=Observed(refused={jname: "exceeded quota: q"}))
    assert not said.events  # the warning once per refusal, not once per pass


def test_a_vanished_job_is_recreated_with_a_warning_announced_by_the_create():
    first = step()
    again = step(old=first.engine)
    (create,) = again.actions
    assert create.name == first.actions[0].name and [e.reason for e in create.announce] == ["BuildJobMissing"]


# ---- 2. stopping builds nobody wants ------------------------------------------------------------

def test_stop_unwanted_builds_says_why():
    old_key = JobView("digits-build-sm80-old", "sm80", "old", "Active")
    gone = JobView("digits-build-sm90-x", "sm90", "x", "Active")
    done = JobView("digits-build-sm80-done", "sm80", "done", "Failed")
    going = JobView("digits-build-sm80-going", "sm80", "going", "Active", deleting=True)
    stops = reconcile.stop_unwanted_builds([old_key, gone, done, going], {"digits-build-sm80-new"}, {"sm80": SM80})
    assert [(a.name, a.why) for a in stops] == [
        ("digits-build-sm80-old", "the spec changed its cache key"),
        ("digits-build-sm90-x", "its architecture left the fleet")]
    assert [e.reason for a in stops for e in a.announce] == ["BuildStopped", "BuildStopped"]


# ---- 3. architectures that left -----------------------------------------------------------------

def test_departed_engines_keep_their_artifact_and_missing_ones_wait():
    prev = {"sm80": EngineStatus(arch="sm80", state="Ready", cache_key="k", artifact_uri="s3://a", job_name="j"),
            "cpu": EngineStatus(arch="cpu", state="Ready", cache_key="c")}
    out = reconcile.departed_engines(prev, targets={}, missing=["sm90"], fleet={})
    assert (out["sm80"].state, out["sm80"].reason) == ("Removed", "ArchitectureGone")
    assert out["sm80"].artifact_uri == "s3://a" and out["sm80"].job_name is None
    assert out["cpu"].reason == "NotRequested"
    assert out["sm90"] == EngineStatus(arch="sm90", state="Pending", reason="NoNodes",
                                       message="no schedulable nodes with compute capability sm90")


# ---- 4. rollout -----------------------------------------------------------------------------------

def test_plan_rollout_keeps_the_previous_engine_until_the_new_one_is_ready():
    old = DeploymentView("digits-sm80", "sm80", "s3://old", "old", "h", 2, True)
    building = {"sm80": EngineStatus(arch="sm80", state="Building", cache_key="new")}
    rollout = reconcile.plan_rollout(REF, SPEC, SETTINGS, {"sm80": SM80}, building,
                                     Observed(deployments={"sm80": old}),
                                     {"sm80": EngineStatus(arch="sm80", state="Ready", serving_cache_key="old")})
    assert rollout.plan["sm80"][1:] == ("s3://old", "old")
    assert rollout.engines["sm80"].serving_cache_key == "old"
    # an architecture gone from the targets: its Deployment is scaled to 0
    gone = reconcile.plan_rollout(REF, SPEC, SETTINGS, {}, {}, Observed(deployments={"sm80": old}), {})
    assert [(type(a).__name__, a.name, a.replicas) for a in gone.actions] == [("Scale", "digits-sm80", 0)]


def test_plan_rollout_serves_a_ready_engine_and_announces_only_a_new_one():
    ready = {"sm80": EngineStatus(arch="sm80", state="Ready", cache_key="new", artifact_uri="s3://new")}
    fresh = reconcile.plan_rollout(REF, SPEC, SETTINGS, {"sm80": SM80}, ready, Observed(), {})
    kinds = [a.obj["kind"] for a in fresh.actions]
    assert kinds == ["ConfigMap", "Service", "Deployment"] and fresh.pending == {"sm80"}
    assert [e.reason for e in fresh.actions[-1].announce] == ["RollingOut"]
    assert fresh.engines["sm80"].serving_cache_key is None  # not serving until its pods are available


# ---- 5. conditions --------------------------------------------------------------------------------

def test_built_condition_names_the_first_blocker():
    engines = {"sm80": EngineStatus(arch="sm80", state="Ready", cache_key="a"),
               "sm90": EngineStatus(arch="sm90", state="Building", cache_key="b", reason="Building")}
    targets = {"sm80": SM80, "sm90": SM90}
    building = reconcile.built_condition(targets, engines, [])
    assert (building.status, building.reason, building.message) == ("False", "Building", "building sm90")
    engines["sm90"] = engines["sm90"].model_copy(update={"state": "Failed", "reason": "AccuracyGateFailed",
                                                         "message": "drop 0.3"})
    failed = reconcile.built_condition(targets, engines, [])
    assert (failed.reason, failed.message) == ("AccuracyGateFailed", "sm90: drop 0.3")
    engines["sm90"] = engines["sm90"].model_copy(update={"state": "Ready", "reason": "Succeeded"})
    assert reconcile.built_condition(targets, engines, ["sm75"]).reason == "ArchitectureUnavailable"
    assert reconcile.built_condition(targets, engines, []).status == "True"


def test_ready_summarises_and_transition_times_move_only_on_a_flip():
    ok = cond.make("Built", True, "Built")
    gate = reconcile.gate_condition(SPEC, {}, {})
    waiting = cond.make("Serving", False, "RollingOut", "waiting for Deployments of sm80")
    ready = cond.ready_summary(ok, gate, waiting)
    assert (ready.status, ready.reason, ready.message) == ("False", "RollingOut", waiting.message)
    first = cond.merge([], [ready], 1, "t0")
    same = cond.merge(first, [cond.make("Ready", False, "Building")], 2, "t1")
    assert same[0].last_transition_time == "t0" and same[0].observed_generation == 2
    flipped = cond.merge(same, [cond.ready_summary(ok, gate, cond.make("Serving", True, "Serving"))], 2, "t2")
    assert (flipped[0].status, flipped[0].last_transition_time) == ("True", "t2")


def test_serving_condition_reports_quota_then_stuck_then_rollout():
    plan = {"sm80": (SM80, "s3://a", "a")}
    stuck = DeploymentView("digits-sm80", "sm80", "s3://a", "a", "h", 1, False, stuck="deadline exceeded")
    observed = Observed(deployments={"sm80": stuck})
    assert reconcile.serving_condition(plan, observed, set(), 1, {"sm80": "exceeded quota: q"}).reason == "QuotaExceeded"
    assert reconcile.serving_condition(plan, observed, set(), 1, {}).reason == "ProgressDeadlineExceeded"
    assert reconcile.serving_condition(plan, observed, {"sm80"}, 1, {}).reason == "RollingOut"
    assert reconcile.serving_condition({}, Observed(), set(), 1, {}).reason == "NoEngine"


# ---- the API boundary -------------------------------------------------------------------------------

def test_the_status_turns_into_camel_case_only_in_the_patch_and_foreign_conditions_pass_unchanged():
    tuned = {"type": "Tuned", "status": "True", "reason": "Converged", "lastTransitionTime": "t0"}
    status = reconcile.parse_status({"conditions": [tuned], "engines": [], "observedGeneration": 1})
    d = reconcile.decide(model=REF, raw_spec=model()["spec"], generation=1, status=status, fleet={"sm80": SM80},
                         observed=Observed(), settings=SETTINGS, published=lambda uri: False,
                         secret_exists=lambda name: True, now=NOW)
    assert all(isinstance(e, EngineStatus) for e in d.status.engines)
    patch = d.patch
    assert patch["engines"][0]["cacheKey"] == d.status.engines[0].cache_key
    assert tuned in patch["conditions"]  # exactly as read: no defaults filled in
    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Built", "AccuracyGatePassed", "Serving", "Tuned"]


def test_a_status_someone_else_broke_is_read_as_far_as_it_goes():
    status = reconcile.parse_status({"conditions": [{"type": "Odd", "status": "maybe"}],
                                     "engines": [{"arch": "sm80", "state": "Ready", "cacheKey": "k"}]})
    assert [e.arch for e in status.engines] == ["sm80"] and status.conditions == []
