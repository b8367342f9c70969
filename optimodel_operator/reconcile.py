"""Reconcile decisions (pure): spec + fleet + what exists → actions and the new status.

The caller (handlers.py) gathers what exists from kopf indexes, passes the two
lookups that touch the outside world (is an artifact published, does a Secret
exist) as callables, and carries out the actions. Nothing here talks to the API,
so every decision has a unit test.

decide() reads in numbered steps, each a pure function with its own tests:
(1) engine_step per architecture, (2) stop_unwanted_builds, (3) departed_engines,
(4) plan_rollout, (5) status_of (conditions and status).

Rules, in the words of the issue:
- one builder Job per (target, cache key), none on a cache hit; the Job name
  carries the key so a second create is an AlreadyExists, never a duplicate;
- a new engine rolls out only once its build (and gate) passed; until then, and
  after a failed rebuild, a Deployment keeps the artifact it already serves;
- a failed build stops (no new Job for that key) until the spec changes the key, a new
  optimodel.io/rebuild value asks again, or, for a transient failure, its backoff is over
  (a retry is a new Job, <name>-r<attempt>);
- a ResourceQuota that refuses a Job or a Deployment's pods is QuotaExceeded, with its message;
- a Job that vanished while its build was pending is recreated;
- an architecture that left the fleet: its running build is stopped and its
  Deployment scaled to 0 (the artifact stays in the store).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Mapping

from pydantic import ValidationError

from optimodel.artifact import artifact_uri, timing_cache_uri
from optimodel.batching import BatchingConfig
from optimodel.build import TRANSIENT_REASONS, BuildResult
from optimodel.cache_key import cache_key, canonical_options, model_digest
from optimodel.manifest import field_errors
from optimodel.spec import Accuracy, Condition, EngineStatus, OptimizedModelSpec, OptimizedModelStatus, ServingStatus
from optimodel.target import Target

from optimodel_operator import render
from optimodel_operator import status as cond
from optimodel_operator.discovery import desired_targets
from optimodel_operator.settings import Settings

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
JOB_FAILURE_REASONS = {"DeadlineExceeded": "BuildTimedOut", "BackoffLimitExceeded": "BuildFailed",
                       "PodFailurePolicy": "BuildFailed"}


# ---- what exists -------------------------------------------------------------

@dataclass(frozen=True)
class JobView:
    name: str
    arch: str
    cache_key: str
    state: str  # Active | Succeeded | Failed
    reason: str | None = None
    message: str | None = None
    deleting: bool = False

    @classmethod
    def from_job(cls, job: Mapping) -> "JobView":
        meta, status = job.get("metadata") or {}, job.get("status") or {}
        labels = meta.get("labels") or {}
        state, reason, message = "Active", None, None
        for c in status.get("conditions") or []:
            if c.get("status") != "True":
                continue
            # SuccessCriteriaMet / FailureTarget (Kubernetes >= 1.31) come first, while the pods
            # still terminate; the outcome is decided then, Complete / Failed only follow it
            if c.get("type") in ("Complete", "SuccessCriteriaMet") and state != "Failed":
                state = "Succeeded"
            elif c.get("type") in ("Failed", "FailureTarget"):
                state, reason, message = "Failed", c.get("reason"), c.get("message")
        if state == "Active" and (status.get("succeeded") or 0) >= 1:
            state = "Succeeded"
        return cls(name=meta.get("name", ""), arch=labels.get(render.L_ARCH, ""),
                   cache_key=labels.get(render.L_KEY, ""), state=state, reason=reason, message=message,
                   deleting=bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True)
class PodView:
    name: str
    job: str
    created: str = ""
    waiting_reason: str | None = None
    waiting_message: str | None = None
    terminated_message: str | None = None
    exit_code: int | None = None

    @classmethod
    def from_pod(cls, pod: Mapping) -> "PodView":
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        job = labels.get("job-name") or labels.get("batch.kubernetes.io/job-name") or ""
        waiting = terminated = None
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = waiting or state.get("waiting")
            terminated = terminated or state.get("terminated")
        return cls(name=meta.get("name", ""), job=job, created=meta.get("creationTimestamp") or "",
                   waiting_reason=(waiting or {}).get("reason"), waiting_message=(waiting or {}).get("message"),
                   terminated_message=(terminated or {}).get("message"),
                   exit_code=(terminated or {}).get("exitCode"))


@dataclass(frozen=True)
class DeploymentView:
    name: str
    arch: str
    artifact_uri: str
    cache_key: str
    config_hash: str
    replicas: int
    available: bool  # rolled out: every pod runs the current template and is available
    stuck: str | None = None  # the Progressing condition's message when the progress deadline passed
    quota: str | None = None  # ReplicaFailure's message when a ResourceQuota refused its pods

    @classmethod
    def from_deployment(cls, dep: Mapping) -> "DeploymentView":
        meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
        ann = meta.get("annotations") or {}
        replicas = spec.get("replicas", 1)
        stuck = quota = None
        for c in status.get("conditions") or []:
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
                stuck = c.get("message") or "the Deployment exceeded its progress deadline"
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True" and is_quota(c.get("message")):
                quota = c.get("message")
        return cls(name=meta.get("name", ""), arch=(meta.get("labels") or {}).get(render.L_ARCH, ""),
                   artifact_uri=ann.get(render.A_ARTIFACT, ""), cache_key=ann.get(render.A_KEY, ""),
                   config_hash=ann.get(render.A_HASH, ""), replicas=replicas,
                   available=rolled_out(meta, replicas, status), stuck=stuck, quota=quota)


def is_quota(message: str | None) -> bool:
    """A ResourceQuota's refusal, as the API server words it ('exceeded quota: <name>, requested: ...')."""
    return "exceeded quota" in (message or "")


def rolled_out(meta: Mapping, replicas: int, status: Mapping) -> bool:
    """The rule of `kubectl rollout status`: mid-surge the old pods still count in
    status.replicas and may be the only available ones, so matching spec.replicas is not enough."""
    updated = status.get("updatedReplicas") or 0
    return ((status.get("observedGeneration") or 0) >= (meta.get("generation") or 0)
            and updated >= replicas
            and (status.get("replicas") or 0) <= updated
            and (status.get("availableReplicas") or 0) >= updated)


@dataclass
class Observed:
    jobs: dict[str, JobView] = field(default_factory=dict)  # by Job name
    pods: dict[str, list[PodView]] = field(default_factory=dict)  # by Job name
    deployments: dict[str, DeploymentView] = field(default_factory=dict)  # by arch
    service_hash: str | None = None  # None: no Service yet
    batching_json: str | None = None  # None: no ConfigMap yet
    refused: dict[str, str] = field(default_factory=dict)  # child name -> the quota's refusal of its last write


# ---- what to do ----------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


# Each action carries the events that announce it (announce): the controller posts them only
# when the write changed something (a create answered AlreadyExists announces nothing), so a
# reconcile that runs before the watch shows its own writes repeats no event.

@dataclass(frozen=True)
class CreateJob:
    name: str
    arch: str
    cache_key: str
    job: dict
    request: dict  # the ConfigMap with the build request, created right after the Job
    announce: tuple[Event, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class DeleteJob:
    name: str
    why: str
    announce: tuple[Event, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Apply:
    """Server-side apply of a whole object the operator owns."""
    obj: dict
    announce: tuple[Event, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Scale:
    name: str
    replicas: int
    announce: tuple[Event, ...] = field(default=(), compare=False)


@dataclass
class Decision:
    actions: list = field(default_factory=list)
    status: OptimizedModelStatus = field(default_factory=OptimizedModelStatus)
    events: list[Event] = field(default_factory=list)
    valid: bool = True
    requeue_after: float | None = None  # seconds until a retry is due: look again then

    @property
    def patch(self) -> dict:
        """The status as the API stores it: what the controller merge-patches (the API boundary)."""
        return {**self.status.wire(), "conditions": [cond.wire(c) for c in self.status.conditions]}

    def all_events(self) -> list[Event]:
        """What a pass posts when every write changes something: its own events, then the actions' announcements."""
        return self.events + [e for a in self.actions for e in a.announce]


def parse_status(raw: Mapping | OptimizedModelStatus | None) -> OptimizedModelStatus:
    """The status as read from the API, typed. What this operator cannot read (a condition someone
    else wrote badly) is left out rather than failing the reconcile."""
    if isinstance(raw, OptimizedModelStatus):
        return raw
    raw = dict(raw or {})
    try:
        return OptimizedModelStatus.model_validate(raw)
    except ValidationError:
        pass
    conditions, engines = [], []
    for c in raw.get("conditions") or []:
        try:
            conditions.append(cond.parse(c))
        except ValidationError:
            continue
    for e in raw.get("engines") or []:
        try:
            engines.append(EngineStatus.model_validate(e))
        except ValidationError:
            continue
    return OptimizedModelStatus(observed_generation=raw.get("observedGeneration"), conditions=conditions,
                                engines=engines)


# ---- retries of failed builds ------------------------------------------------------

@dataclass(frozen=True)
class RetryPlan:
    retry_now: "Tries | None" = None  # the attempt to start now, or None
    manual: bool = False
    tries: "Tries | None" = None  # what to record when not retrying now
    retry_at: str | None = None
    requeue_after: float | None = None

    def stamp(self, engine: EngineStatus) -> EngineStatus:
        out = self.tries.stamp(engine) if self.tries else engine
        if self.retry_at:
            out = out.model_copy(update={"retry_at": self.retry_at,
                                         "message": f"{out.message or ''} (retry at {self.retry_at})"[:1000]})
        return out


@dataclass(frozen=True)
class Tries:
    """Attempts at one cache key: each retry is a new Job (name suffix -r<attempt>), so a failed
    Job keeps its pods and logs and a retry never races the deletion of the one before."""
    attempt: int = 0  # the Job of this key now: 0 first, +1 per retry
    retries: int = 0  # automatic retries since the last manual one
    rebuild: str | None = None  # the last optimodel.io/rebuild value honoured

    @classmethod
    def of(cls, old: EngineStatus | None, key: str) -> "Tries":
        if old is None:
            return cls()
        same = old.cache_key == key
        return cls(attempt=(old.attempt or 0) if same else 0, retries=(old.retries or 0) if same else 0,
                   rebuild=old.rebuild)

    def stamp(self, engine: EngineStatus) -> EngineStatus:
        """The engine with these attempts recorded (and no retry due)."""
        return engine.model_copy(update={"attempt": self.attempt or None, "retries": self.retries or None,
                                         "rebuild": self.rebuild, "retry_at": None})

    def after_failure(self, transient: bool, rebuild: str | None, old: EngineStatus | None, settings: Settings,
                      now: str) -> RetryPlan:
        """A new rebuild annotation value retries once at once; a transient failure retries with
        exponential backoff up to settings.build_retries times; a deterministic one waits for a new key.
        old: the engine's last status when it was of the same key."""
        if rebuild and rebuild != self.rebuild:
            return RetryPlan(retry_now=Tries(self.attempt + 1, 0, rebuild), manual=True)
        if not transient or self.retries >= settings.build_retries:
            return RetryPlan(tries=self)
        due = old.retry_at if old is not None and (old.attempt or 0) == self.attempt and old.retry_at else None
        if due is None:
            delay = settings.build_retry_seconds * 2 ** self.retries
            due = _iso(_parse(now) + timedelta(seconds=delay))
        wait = (_parse(due) - _parse(now)).total_seconds()
        if wait <= 0:
            return RetryPlan(retry_now=Tries(self.attempt + 1, self.retries + 1, self.rebuild))
        return RetryPlan(tries=self, retry_at=due, requeue_after=wait)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- spec validation -------------------------------------------------------------

def _camel(part: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", part) if w)


def spec_error(raw_spec: Mapping | None) -> tuple[OptimizedModelSpec | None, str, str]:
    """(spec, "", "") when valid, else (None, reason naming the field, message)."""
    try:
        return OptimizedModelSpec.model_validate(raw_spec or {}), "", ""
    except ValidationError as exc:
        errors = field_errors(exc, prefix="spec")
        path = re.sub(r"\[\d+\]", "", errors[0].path)  # the reason names the field, not the list item
        reason = "InvalidSpec" + "".join(_camel(p) for p in path.split(".")[1:])
        return None, reason[:128], f"{path}: " + "; ".join(map(str, errors))[:1000]


def _spec_uris(spec: OptimizedModelSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every URI a build or a server reads."""
    opt = spec.optimization
    uris = [("spec.model.uri", spec.model.uri)]
    if spec.model.code:
        uris.append(("spec.model.code.uri", spec.model.code.uri))
    if opt.pruning and opt.pruning.distillation:
        uris.append(("spec.optimization.pruning.distillation.datasetUri", opt.pruning.distillation.dataset_uri))
    if opt.calibration:
        uris.append(("spec.optimization.calibration.datasetUri", opt.calibration.dataset_uri))
    if opt.accuracy_gate:
        uris.append(("spec.optimization.accuracyGate.datasetUri", opt.accuracy_gate.dataset_uri))
    return uris


def cluster_error(spec: OptimizedModelSpec, settings: Settings) -> tuple[str, str]:
    """("", "") when a cluster can build this spec, else (reason naming the field, message).

    What `optimodel run` accepts but a cluster cannot: code found only beside a local
    manifest, and file:// paths nothing mounts into the pods."""
    if spec.model.format == "pytorch" and spec.model.code is None:
        return ("InvalidSpecModelCode",
                f"spec.model.code: format pytorch imports {spec.model.entrypoint} in the builder pod, which has "
                "no code of the model; set spec.model.code.uri to its .py file or an archive in the store, "
                "or export the model with torch.export and use format torch-export")
    if not settings.allow_file_uris:
        for path, uri in _spec_uris(spec):
            if uri.startswith("file:"):
                reason = "InvalidSpec" + "".join(_camel(p) for p in path.split(".")[1:])
                return (reason[:128], f"{path}: {uri} is a path on one machine and nothing mounts it into the "
                                      "builder or server pods; use pvc://<claim>/<path>, s3://, gs:// or http(s)://")
    return "", ""


# ---- the decision ----------------------------------------------------------------

def target_keys(spec: OptimizedModelSpec, targets: Mapping[str, Target], settings: Settings) -> dict[str, str]:
    digest = model_digest(spec.model)
    options = canonical_options(spec.model, spec.optimization, spec.serving.max_batch_size)
    return {arch: cache_key(digest, options, t, settings.toolchain_for(t)) for arch, t in targets.items()}


def _result(pods: list[PodView]) -> BuildResult | None:
    for pod in sorted(pods, key=lambda p: p.created, reverse=True):
        text = (pod.terminated_message or "").strip()
        for line in reversed(text.splitlines()):
            try:
                return BuildResult.model_validate_json(line)
            except ValueError:
                continue
    return None


def _with_accuracy(engine: EngineStatus, result: BuildResult | None) -> EngineStatus:
    """The engine's status with the gate's figures filled in when they arrived late (never dropped)."""
    if engine.accuracy or result is None or result.accuracy is None or result.cache_key != engine.cache_key:
        return engine
    return engine.model_copy(update={"accuracy": Accuracy.model_validate(result.accuracy.wire())})


def _log_tail(pods: list[PodView]) -> str:
    for pod in sorted(pods, key=lambda p: p.created, reverse=True):
        if pod.terminated_message:
            return pod.terminated_message.strip()[-500:]
    return ""


def _engine(target: Target, state: str, key: str, **kw) -> EngineStatus:
    return EngineStatus(arch=target.arch, product=target.product, state=state, cache_key=key, **kw)


def _built(target: Target, key: str, jname: str, uri: str, result, common: dict, events: list) -> EngineStatus:
    """The engine a Job built and published: Ready, with the accuracy its pod reported if any."""
    events.append(Event("Normal", "BuildSucceeded", f"{target.arch}: engine {key} published at {uri}"))
    return _engine(target, "Ready", key, reason="Succeeded", accuracy=result.accuracy if result else None,
                   message=f"built by Job {jname}", **common)


def decide(*, model: render.ModelRef, raw_spec: Mapping | None, generation: int | None,
           status: OptimizedModelStatus | Mapping | None, fleet: Mapping[str, Target], observed: Observed,
           settings: Settings, published: Callable[[str], bool], secret_exists: Callable[[str], bool], now: str,
           rebuild: str | None = None) -> Decision:
    """rebuild: the model's optimodel.io/rebuild annotation (a new value retries failed builds once)."""
    status = parse_status(status)
    prev = {e.arch: e for e in status.engines}
    out = Decision()

    spec, bad_reason, bad_message = spec_error(raw_spec)
    if spec is not None:
        bad_reason, bad_message = cluster_error(spec, settings)
        spec = None if bad_reason else spec
    if spec is None:
        # no Jobs, no rollout: whatever already serves keeps serving
        out.valid = False
        conds = [cond.make("Ready", False, bad_reason, bad_message), cond.make("Built", False, bad_reason, bad_message)]
        out.status = OptimizedModelStatus(observed_generation=generation, engines=list(status.engines),
                                          conditions=cond.merge(status.conditions, conds, generation, now))
        if (cond.find(status.conditions, "Ready") or _NO_CONDITION).reason != bad_reason:
            out.events.append(Event("Warning", bad_reason, bad_message))
        return out

    # ---- 1. an engine per architecture: built, building, failed (retried?) or to build --------
    targets, missing = desired_targets(spec.targets.gpu_architectures, spec.targets.cpu, fleet, settings.cpu_target)
    keys = target_keys(spec, targets, settings)
    tries = {arch: Tries.of(prev.get(arch), keys[arch]) for arch in targets}
    current_jobs = {render.job_name(model.name, t, keys[a], tries[a].attempt) for a, t in targets.items()}
    engines: dict[str, EngineStatus] = {}

    secrets: dict[str, bool] = {}

    def secret_once(name: str) -> bool:
        if name not in secrets:
            secrets[name] = secret_exists(name)
        return secrets[name]

    for arch, target in targets.items():
        step = engine_step(arch, target, keys[arch], tries[arch], prev.get(arch), model=model, spec=spec,
                           settings=settings, observed=observed, generation=generation, published=published,
                           secret_exists=secret_once, rebuild=rebuild, now=now)
        engines[arch] = step.engine
        out.actions += step.actions
        out.events += step.events
        if step.job_name:
            current_jobs.add(step.job_name)
        if step.requeue_after is not None:
            out.requeue_after = min(out.requeue_after or step.requeue_after, step.requeue_after)

    # ---- 2. builds nobody wants any more hold a GPU for nothing: stop them --------------
    out.actions += stop_unwanted_builds(observed.jobs.values(), current_jobs, targets)

    # ---- 3. architectures that left the spec or the fleet ---------------------------------
    engines.update(departed_engines(prev, targets, missing, fleet))

    # ---- 4. rollout: serve every Ready engine, keep the previous one until then -----------
    rollout = plan_rollout(model, spec, settings, targets, engines, observed, prev)
    out.actions += rollout.actions

    # ---- 5. conditions and status ---------------------------------------------------------
    out.status = status_of(model, spec, generation, status.conditions, now, targets, missing, rollout.engines,
                           observed, rollout)
    return out


_NO_CONDITION = cond.make("None", None, "None")


@dataclass
class EngineStep:
    """Step 1's answer for one architecture."""
    engine: EngineStatus | None = None
    actions: list = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    job_name: str | None = None  # a retry's Job, wanted from now on

    def done(self, engine: EngineStatus) -> "EngineStep":
        self.engine = engine
        return self


def engine_step(arch: str, target: Target, key: str, tried: Tries, old: EngineStatus | None, *,
                model: render.ModelRef, spec: OptimizedModelSpec, settings: Settings, observed: Observed,
                generation: int | None, published: Callable[[str], bool], secret_exists: Callable[[str], bool],
                rebuild: str | None, now: str) -> EngineStep:
    """The engine of one architecture: Ready (built or a cache hit), Building, Failed (and whether a
    retry is due), or a new builder Job to create, with the events of its transition.
    old: its engine in the last status (any cache key), None when there was none."""
    step = EngineStep()
    uri = artifact_uri(settings.store_uri, model.namespace, model.name, key)
    jname = render.job_name(model.name, target, key, tried.attempt)
    job = observed.jobs.get(jname)
    pods = observed.pods.get(jname, [])
    same = old is not None and old.cache_key == key
    old_reason = old.reason if old is not None else None
    common = dict(artifact_uri=uri, precision=spec.optimization.precision, job_name=jname if job else None)
    transient = False  # a failure another attempt may not repeat (retried with backoff)
    announce: list[Event] = []  # what the CreateJob, if any, announces
    engine: EngineStatus | None

    if same and old.state == "Ready":
        # the pod's result may arrive after the engine turned Ready (published first)
        engine = _with_accuracy(old, _result(pods))
    elif job is not None and job.state == "Succeeded":
        result = _result(pods)
        if published(uri):
            engine = _built(target, key, jname, uri, result, common, step.events)
        else:
            engine = _engine(target, "Failed", key, reason="ArtifactMissing",
                             message=f"Job {jname} succeeded but {uri} has no verified manifest", **common)
            transient = True  # the store lost or has not shown the artifact yet
            if not (same and old_reason == "ArtifactMissing"):
                step.events.append(Event("Warning", "ArtifactMissing", engine.message))
    elif job is not None and job.state == "Failed":
        result = _result(pods)
        waiting = next((p for p in pods if p.waiting_reason in IMAGE_PULL_REASONS), None)
        if result is not None and result.state == "Failed":
            reason, message = result.reason.value, result.message
            transient = result.reason in TRANSIENT_REASONS
        elif waiting is not None:
            reason, message = "BuilderImagePullFailed", f"{waiting.waiting_reason}: {waiting.waiting_message or ''}"
        else:
            reason = JOB_FAILURE_REASONS.get(job.reason or "", "BuildFailed")
            message = job.message or _log_tail(pods) or "the builder failed without a result"
            # pods that died without answering (evicted, OOM-killed, node lost) may pass on another node
            transient = job.reason == "BackoffLimitExceeded"
        engine = _engine(target, "Failed", key, reason=reason, message=message[:1000],
                         accuracy=result.accuracy if result else None, **common)
        if not (same and old.state == "Failed" and old_reason == reason):
            step.events.append(Event("Warning", reason, f"{arch}: {message[:500]}"))
    elif published(uri):
        if job is not None:  # the builder publishes just before its Job reports success
            engine = _built(target, key, jname, uri, _result(pods), common, step.events)
        else:
            engine = _engine(target, "Ready", key, reason="CacheHit",
                             message="artifact already published; no build needed", **common)
            if not same:
                step.events.append(Event("Normal", "CacheHit", f"{arch}: reusing engine {key}"))
    elif job is not None:
        waiting = next((p for p in pods if p.waiting_reason), None)
        reason, message = "Building", f"building in Job {jname}"
        if job.deleting:
            reason, message = "JobDeleting", f"Job {jname} is being deleted; a new one follows"
        elif waiting is not None and waiting.waiting_reason in IMAGE_PULL_REASONS:
            reason = "BuilderImagePullFailed"
            message = f"{waiting.waiting_reason} pulling {settings.builder_image}: {waiting.waiting_message or ''}"
        elif waiting is not None and waiting.waiting_reason == "CreateContainerConfigError":
            reason, message = "BuilderConfigError", waiting.waiting_message or reason
        engine = _engine(target, "Building", key, reason=reason, message=message[:1000], **common)
        if reason != "Building" and old_reason != reason:
            step.events.append(Event("Warning", reason, f"{arch}: {message[:500]}"))
    elif same and old.state == "Failed":
        # a failed key is not rebuilt until the spec changes it, a rebuild annotation asks, or its
        # transient failure's retry is due (retryAt is set only for those)
        engine = Tries().stamp(old)
        transient = bool(old.retry_at)
    else:
        engine = None

    if engine is not None and engine.state == "Failed":
        plan = tried.after_failure(transient, rebuild, old if same else None, settings, now)
        if plan.retry_now is None:
            step.requeue_after = plan.requeue_after
            return step.done(plan.stamp(engine))
        tried = plan.retry_now
        why = ("optimodel.io/rebuild asked for a rebuild" if plan.manual
               else f"retry {tried.retries} of {settings.build_retries} after a transient failure")
        announce.append(Event("Normal", "BuildRetried", f"{arch}: {why} ({engine.reason})"))
        jname = render.job_name(model.name, target, key, tried.attempt)
        step.job_name = jname
        if jname in observed.jobs:  # the retry's Job exists already (a restart mid-retry)
            return step.done(tried.stamp(_engine(target, "Building", key, reason="Building",
                                                 message=f"building in Job {jname}",
                                                 **{**common, "job_name": jname})))
    elif engine is not None:
        return step.done(tried.stamp(engine))

    secret = spec.model.credentials_secret
    if secret and not secret_exists(secret):
        message = f"Secret '{secret}' (spec.model.credentialsSecret) not found in namespace {model.namespace}"
        if old_reason != "SecretMissing":
            step.events.append(Event("Warning", "SecretMissing", message))
        return step.done(_engine(target, "Pending", key, reason="SecretMissing", message=message,
                                 artifact_uri=uri, precision=spec.optimization.precision))
    refused = observed.refused.get(jname)  # a ResourceQuota refused the Job: say so, and try again
    if refused is not None and old_reason != "QuotaExceeded":
        step.events.append(Event("Warning", "QuotaExceeded", f"{arch}: {refused[:500]}"))
    if same and old.state == "Building" and old.job_name == jname:
        announce.append(Event("Warning", "BuildJobMissing", f"{arch}: Job {jname} disappeared; recreated it"))
    elif tried.attempt == 0:
        announce.append(Event("Normal", "BuildStarted", f"{arch}: Job {jname} builds engine {key}"))
    request = render.build_request(model, spec, target, key, uri, settings.toolchain_for(target),
                                   timing_cache=timing_cache_uri(settings.store_uri, arch, settings.tensorrt_version())
                                   if target.kind == "gpu" else None)
    step.actions.append(CreateJob(
        name=jname, arch=arch, cache_key=key,
        job=render.builder_job(model, spec, target, key, jname, settings, generation),
        request=render.request_configmap(model, jname, request, target), announce=tuple(announce)))
    if refused is not None:
        return step.done(tried.stamp(_engine(target, "Pending", key, reason="QuotaExceeded", message=refused[:1000],
                                             artifact_uri=uri, precision=spec.optimization.precision)))
    return step.done(tried.stamp(_engine(target, "Building", key, reason="Building",
                                         message=f"building in Job {jname}", **{**common, "job_name": jname})))


def stop_unwanted_builds(jobs: Iterable[JobView], current: set[str],
                         targets: Mapping[str, Target]) -> list[DeleteJob]:
    """Active Jobs of an old key or of an architecture no longer built: delete them."""
    out = []
    for job in jobs:
        if job.state == "Active" and not job.deleting and job.name not in current:
            why = ("its architecture left the fleet" if job.arch not in targets
                   else "the spec changed its cache key")
            out.append(DeleteJob(job.name, why, announce=(
                Event("Normal", "BuildStopped", f"{job.arch}: deleted Job {job.name}: {why}"),)))
    return out


def departed_engines(prev: Mapping[str, EngineStatus], targets: Mapping[str, Target], missing: list[str],
                     fleet: Mapping[str, Target]) -> dict[str, EngineStatus]:
    """Engines of architectures not built now: Removed (their artifact stays cached), or Pending
    when the spec names an architecture the fleet lacks."""
    engines: dict[str, EngineStatus] = {}
    for arch, old in prev.items():
        if arch in targets or arch in missing:
            continue
        if arch in fleet or arch == "cpu":
            reason, why = "NotRequested", "spec.targets no longer asks for this architecture"
        else:
            reason, why = "ArchitectureGone", "no schedulable nodes of this architecture left; the artifact stays cached"
        engines[arch] = old.model_copy(update={"arch": arch, "state": "Removed", "reason": reason, "message": why,
                                               "job_name": None})
    for arch in missing:
        engines[arch] = EngineStatus(arch=arch, state="Pending", reason="NoNodes",
                                     message=f"no schedulable nodes with compute capability {arch}")
    return engines


@dataclass
class Rollout:
    batching: BatchingConfig
    plan: dict[str, tuple[Target, str, str]]  # arch -> (target, artifact, key) to serve
    pending: set[str]  # archs whose Deployment is being applied now
    engines: dict[str, EngineStatus]  # with servingCacheKey
    actions: list = field(default_factory=list)


def plan_rollout(model: render.ModelRef, spec: OptimizedModelSpec, settings: Settings, targets: Mapping[str, Target],
                 engines: Mapping[str, EngineStatus], observed: Observed,
                 prev: Mapping[str, EngineStatus]) -> Rollout:
    batching = render.batching_config(spec, _current_wait(observed.batching_json),
                                      _current_by_arch(observed.batching_json))
    plan: dict[str, tuple[Target, str, str]] = {}
    for arch, target in targets.items():
        eng = engines[arch]
        dep = observed.deployments.get(arch)
        if eng.state == "Ready":
            plan[arch] = (target, eng.artifact_uri or "", eng.cache_key or "")
        elif dep is not None and dep.artifact_uri:
            plan[arch] = (target, dep.artifact_uri, dep.cache_key)  # the previous engine keeps serving
    out = Rollout(batching=batching, plan=plan, pending=set(), engines={})
    if plan:
        cm = render.batching_configmap(model, batching)
        if observed.batching_json != cm["data"][render.BATCHING_FILE]:
            out.actions.append(Apply(cm))
        svc = render.service(model)
        if observed.service_hash != svc["metadata"]["annotations"][render.A_HASH]:
            out.actions.append(Apply(svc))
    for arch, (target, uri, key) in plan.items():
        dep = render.deployment(model, spec, target, uri, key, settings)
        have = observed.deployments.get(arch)
        if (have is None or have.config_hash != dep["metadata"]["annotations"][render.A_HASH]
                or have.replicas != dep["spec"]["replicas"]):
            rolling = () if have is not None and have.cache_key == key else (
                Event("Normal", "RollingOut", f"{arch}: serving engine {key}"),)
            out.actions.append(Apply(dep, announce=rolling))
            out.pending.add(arch)
    for arch, eng in engines.items():
        serving = None
        if arch in plan:
            serving = _serving_key(plan[arch][2], observed.deployments.get(arch), arch in out.pending, prev.get(arch))
        out.engines[arch] = eng.model_copy(update={"serving_cache_key": serving})
    for arch, have in observed.deployments.items():
        if arch not in targets and have.replicas != 0:
            out.actions.append(Scale(have.name, 0, announce=(
                Event("Normal", "ScaledDown", f"{arch}: Deployment {have.name} scaled to 0"),)))
    return out


def status_of(model: render.ModelRef, spec: OptimizedModelSpec, generation: int | None,
              old_conditions: list[Condition], now: str, targets: Mapping[str, Target], missing: list[str],
              engines: Mapping[str, EngineStatus], observed: Observed, rollout: Rollout) -> OptimizedModelStatus:
    built = built_condition(targets, engines, missing)
    gate = gate_condition(spec, targets, engines)
    refused = {arch: observed.refused.get(render.deployment_name(model.name, arch))
               or (observed.deployments[arch].quota if arch in observed.deployments else None)
               for arch in rollout.plan}
    serving = serving_condition(rollout.plan, observed, rollout.pending, spec.serving.replicas,
                                {a: m for a, m in refused.items() if m})
    status = OptimizedModelStatus(
        observed_generation=generation,
        conditions=cond.merge(old_conditions, [cond.ready_summary(built, gate, serving), built, gate, serving],
                              generation, now),
        engines=[engines[a] for a in sorted(engines)])
    if rollout.plan:
        status.serving = ServingStatus(endpoint=render.endpoint(model), max_wait_ms=None
                                       if spec.serving.batching.autotune.enabled else rollout.batching.max_wait_ms)
    return status


def _serving_key(planned: str, dep: DeploymentView | None, pending: bool, old: EngineStatus | None) -> str | None:
    """The engine the pods run: the planned one once its rollout finished, until then the one before."""
    if dep is not None and not pending and dep.cache_key == planned and dep.available:
        return planned
    return old.serving_cache_key if old is not None else None


def _current_by_arch(batching_json: str | None) -> dict[str, float]:
    """The tuner's per-architecture windows in the live ConfigMap (kept across re-renders)."""
    try:
        table = json.loads(batching_json or "{}").get("maxWaitMsByArch") or {}
        return {str(a): float(w) for a, w in table.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _current_wait(batching_json: str | None) -> float | None:
    if not batching_json:
        return None
    try:
        return float(json.loads(batching_json)["maxWaitMs"])
    except (ValueError, KeyError, TypeError):
        return None


def built_condition(targets: Mapping[str, Target], engines: Mapping[str, EngineStatus],
                    missing: list[str]) -> Condition:
    if not targets:
        return cond.make("Built", False, "NoTargets",
                         f"no schedulable nodes for {', '.join(missing)}" if missing else "no build targets")
    current = [engines[a] for a in targets]
    failed = [e for e in current if e.state == "Failed"]
    if failed:
        return cond.make("Built", False, failed[0].reason or "BuildFailed",
                         "; ".join(f"{e.arch}: {e.message or ''}" for e in failed))
    stuck = [e for e in current if e.state in ("Pending", "Building") and e.reason not in (None, "Building")]
    if stuck:
        return cond.make("Built", False, stuck[0].reason, "; ".join(f"{e.arch}: {e.message or ''}" for e in stuck))
    building = [e.arch for e in current if e.state != "Ready"]
    if building:
        return cond.make("Built", False, "Building", f"building {', '.join(building)}")
    if missing:
        return cond.make("Built", False, "ArchitectureUnavailable", f"no schedulable nodes for {', '.join(missing)}")
    return cond.make("Built", True, "Built", f"engines ready for {', '.join(targets)}")


def gate_condition(spec: OptimizedModelSpec, targets: Mapping[str, Target],
                   engines: Mapping[str, EngineStatus]) -> Condition:
    if spec.optimization.accuracy_gate is None:
        return cond.make("AccuracyGatePassed", True, "NoGateConfigured", "optimization.accuracyGate is not set")
    current = [engines[a] for a in targets]
    failed = [e for e in current if e.reason == "AccuracyGateFailed"]
    if failed:
        return cond.make("AccuracyGatePassed", False, "AccuracyGateFailed",
                         "; ".join(f"{e.arch}: {e.message or ''}" for e in failed))
    if current and all(e.state == "Ready" for e in current):
        return cond.make("AccuracyGatePassed", True, "GatePassed", "every engine passed the accuracy gate")
    return cond.make("AccuracyGatePassed", None, "Building", "waiting for builds")


def serving_condition(plan: Mapping[str, tuple], observed: Observed, pending: set[str], replicas: int,
                      refused: Mapping[str, str]) -> Condition:
    """refused: arch -> a ResourceQuota's refusal of its Deployment or of the Deployment's pods."""
    if not plan:
        return cond.make("Serving", False, "NoEngine", "no engine is built yet")
    quota = [(a, m) for a, m in refused.items() if a in plan and m]
    if quota:
        return cond.make("Serving", False, "QuotaExceeded", "; ".join(f"{a}: {m}" for a, m in quota)[:1000])
    if replicas == 0:
        return cond.make("Serving", True, "ScaledToZero", "spec.serving.replicas is 0")
    stuck = [(a, observed.deployments[a].stuck) for a in plan
             if a not in pending and observed.deployments.get(a) and observed.deployments[a].stuck]
    if stuck:
        return cond.make("Serving", False, "ProgressDeadlineExceeded",
                         "; ".join(f"{a}: {message}" for a, message in stuck))
    waiting = [a for a in plan if a in pending or not (observed.deployments.get(a) and observed.deployments[a].available)]
    if waiting:
        return cond.make("Serving", False, "RollingOut", f"waiting for Deployments of {', '.join(waiting)}")
    return cond.make("Serving", True, "Serving", f"serving {', '.join(plan)}")


def status_changed(old: Mapping | None, new: Mapping) -> bool:
    """old: the status as read; new: the patch about to be sent (both camelCase)."""
    old = old or {}
    if old.get("observedGeneration") != new.get("observedGeneration"):
        return True
    if cond.strip_times(old.get("conditions")) != cond.strip_times(new.get("conditions")):
        return True
    if (old.get("engines") or []) != (new.get("engines") or []):
        return True
    old_serving, new_serving = old.get("serving") or {}, new.get("serving") or {}
    return any(old_serving.get(k) != v for k, v in new_serving.items())
