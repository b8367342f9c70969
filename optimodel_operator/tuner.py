"""The latency-SLO tuner's periodic task: one pass per OptimizedModel with autotune on, every intervalSeconds.

Per pass: 1. which architectures serve (the Deployments' index) and their engine profiles
(report.json next to the engine); 2. one Prometheus observation per architecture;
3. the pure policy (optimodel.tuning.policy) per architecture; 4. the windows into the
batching ConfigMap (`maxWaitMsByArch`, which each pod reads for its own arch) when one
moved; 5. status.serving and the Tuned condition (never spec); 6. an Event per change.

The windows live in the ConfigMap, so an operator restart resumes from there. Prometheus
unreachable or answering garbage: every window holds, Tuned says why, the next pass retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from optimodel import storage
from optimodel.batching import BatchingConfig
from optimodel.spec import API_GROUP, API_VERSION, PLURAL, OptimizedModelSpec
from optimodel.tuning import policy
from optimodel.tuning.model import EngineProfile
from optimodel.tuning.observation import Observation, ObservationError
from optimodel.tuning.prometheus import PrometheusSource, Selector

from optimodel_operator import render
from optimodel_operator import status as cond
from optimodel_operator.kube import KubeError, object_path
from optimodel_operator.reconcile import Event

log = logging.getLogger(__name__)
OM_API = f"{API_GROUP}/{API_VERSION}"
# worst first: the condition carries the reason of the architecture that needs attention most
SEVERITY = (policy.PROMETHEUS_NOT_CONFIGURED, policy.PROMETHEUS_UNAVAILABLE, policy.METRICS_MISSING,
            policy.NO_PROFILE, policy.SLO_UNREACHABLE, policy.OVERLOADED, policy.INSUFFICIENT_TRAFFIC,
            policy.TUNING, policy.CONVERGED)


@dataclass
class ArchResult:
    arch: str
    decision: policy.Decision
    observation: Observation | None


@dataclass
class Pass:
    """What one tuning pass of one model decided (pure output of plan_pass)."""

    windows: dict[str, float]
    results: list[ArchResult]
    condition: dict
    serving: dict
    events: list[Event] = field(default_factory=list)
    config_changed: bool = False


def current_windows(batching_json: str | None, archs: list[str], default: float) -> dict[str, float]:
    """Each architecture's window in the live ConfigMap: where a restarted operator resumes."""
    try:
        config = BatchingConfig.model_validate(json.loads(batching_json)) if batching_json else None
    except ValueError:
        config = None
    if config is None:
        return {a: default for a in archs}
    return {a: config.for_arch(a).max_wait_ms for a in archs}


def plan_pass(spec: OptimizedModelSpec, archs: list[str], windows: dict[str, float],
              states: Mapping[str, policy.TunerState], observe: Callable[[str], Observation],
              profiles: Mapping[str, EngineProfile | None], now: str) -> Pass:
    """Decide every architecture's window; observe(arch) may raise ObservationError."""
    bounds = policy.Bounds.from_serving(spec.serving)
    results = []
    for arch in archs:
        state = states.get(arch) or policy.TunerState(window_ms=windows[arch])
        state = replace(state, window_ms=windows[arch])  # the ConfigMap's window; calibration carried over
        try:
            obs = observe(arch)
        except ObservationError as exc:
            results.append(ArchResult(arch, policy.hold(state, bounds, exc.reason,
                                                        f"{exc}; holding {state.window_ms:g} ms"), None))
            continue
        results.append(ArchResult(arch, policy.decide(state, obs, profiles.get(arch), bounds), obs))
    new_windows = {r.arch: r.decision.window_ms for r in results}
    events = [Event("Normal", "Tuned", f"{r.arch}: max_wait_ms {r.decision.previous_ms:g} → "
                                       f"{r.decision.window_ms:g} ms ({r.decision.reason}): {r.decision.message}")
              for r in results if r.decision.changed]
    return Pass(new_windows, results, tuned_condition(results), serving_status(results, now), events,
                config_changed=any(r.decision.changed for r in results))


def tuned_condition(results: list[ArchResult]) -> dict:
    worst = min(results, key=lambda r: SEVERITY.index(r.decision.reason) if r.decision.reason in SEVERITY
                else len(SEVERITY))
    d = worst.decision
    ok = {"True": True, "False": False}.get(d.condition_status)
    if len(results) == 1:
        message = f"{worst.arch}: {d.message}"
    else:
        message = "; ".join(f"{r.arch}: {r.decision.window_ms:g} ms, {r.decision.reason}" for r in results)
        message += f". {worst.arch}: {d.message}"
    return cond.condition("Tuned", ok, d.reason, message[:1000])


def serving_status(results: list[ArchResult], now: str) -> dict:
    """status.serving's tuner fields: the busiest architecture's window, the worst p99, the total rate."""
    observed = [r for r in results if r.observation is not None and r.observation.p99_ms is not None]
    out = {"lastTunedTime": now}
    if results:
        busiest = max(results, key=lambda r: r.observation.answered_rps if r.observation else -1.0)
        out["maxWaitMs"] = busiest.decision.window_ms
    if observed:
        worst = max(r.observation.p99_ms.hi if r.observation.p99_ms.hi != float("inf") else r.observation.p99_ms.lo
                    for r in observed)
        out["p99Ms"] = round(worst, 3)
        out["throughput"] = round(sum(r.observation.answered_rps for r in observed), 3)
    return out


def load_profile(artifact_uri: str, pvc_root: str | None = None) -> EngineProfile | None:
    try:
        report = storage.read_bytes(storage.join(artifact_uri, "report.json"), pvc_root=pvc_root)
        return EngineProfile.from_report(json.loads(report))
    except Exception as exc:  # any store error (fsspec's vary by scheme): tune without a profile, say so
        log.info("no latency profile for %s: %s", artifact_uri, exc)
        return None


class Tuner:
    """Runs plan_pass for each model whose interval is due; effects through the Controller's client."""

    def __init__(self, ctrl, clock: Callable[[], float] = time.monotonic):
        self.ctrl, self.clock = ctrl, clock
        self.states: dict[tuple, policy.TunerState] = {}   # (uid, arch) -> calibration between passes
        self.due: dict[str, float] = {}                    # uid -> next pass
        self.profiles: dict[str, EngineProfile | None] = {}
        url = ctrl.settings.prometheus_url
        self.source = PrometheusSource(url) if url else None
        self.passes = 0

    async def run_forever(self, tick_s: float = 1.0) -> None:
        while True:
            for key in self.due_models():
                try:
                    await self.ctrl.exclusive(key, self.tune, *key)  # never beside a reconcile of it
                except Exception:  # a failing pass must not stop the others; the next interval retries
                    log.exception("tuning %s/%s failed", *key)
            await asyncio.sleep(tick_s)

    def due_models(self) -> list[tuple[str, str]]:
        out, now, live = [], self.clock(), set()
        for (ns, name), store in list(self.ctrl.indexes["om_index"].items()):
            for body in store:
                auto = ((body.get("spec") or {}).get("serving") or {}).get("batching", {}).get("autotune") or {}
                uid = body["metadata"].get("uid", "")
                live.add(uid)
                if not auto.get("enabled") or body["metadata"].get("deletionTimestamp"):
                    self.due.pop(uid, None)
                    continue
                if now >= self.due.get(uid, 0.0):
                    self.due[uid] = now + float(auto.get("intervalSeconds") or 30)
                    out.append((ns, name))
        # a deleted model's pass schedule and calibration would otherwise stay for the life of the process
        for uid in [u for u in self.due if u not in live]:
            del self.due[uid]
        for state_key in [k for k in self.states if k[0] not in live]:
            del self.states[state_key]
        return out

    def tune(self, namespace: str, name: str) -> Pass | None:
        """One pass (blocking; the caller keeps reconciles of this model out meanwhile)."""
        ctrl = self.ctrl
        body = next(iter(ctrl.indexes["om_index"].get((namespace, name), ())), None)
        if body is None:
            return None
        try:
            spec = OptimizedModelSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return None  # the reconcile reports an invalid spec
        model = render.ModelRef.from_body(body)
        deps = {d.arch: d for d in ctrl.indexes["deployment_index"].get((namespace, name), ()) if d.replicas > 0}
        archs = sorted(deps)
        if not archs:
            return None  # nothing serves yet: nothing to tune
        batching_json = ctrl.memory.batching_json(
            (namespace, name), next(iter(ctrl.indexes["batching_index"].get((namespace, name), ())), None))
        windows = current_windows(batching_json, archs, spec.serving.batching.max_wait_ms)
        for arch, dep in deps.items():
            if self.profiles.get(dep.artifact_uri) is None:  # a missing one is looked for again next pass
                self.profiles[dep.artifact_uri] = load_profile(dep.artifact_uri, ctrl.settings.pvc_root)
        profiles = {a: self.profiles.get(deps[a].artifact_uri) for a in archs}
        interval = spec.serving.batching.autotune.interval_seconds

        def observe(arch: str) -> Observation:
            if self.source is None:
                raise ObservationError(policy.PROMETHEUS_NOT_CONFIGURED,
                                       "no Prometheus configured: set OPTIMODEL_PROMETHEUS_URL "
                                       "(the chart's prometheus.url value)")
            return self.source.observe(Selector(namespace, name, arch), interval, spec.serving.batching.autotune.p99_latency_ms)

        states = {a: self.states.get((model.uid, a)) for a in archs}
        result = plan_pass(spec, archs, windows, {a: s for a, s in states.items() if s}, observe, profiles,
                           cond.now_iso())
        self.passes += 1
        for r in result.results:
            self.states[(model.uid, r.arch)] = r.decision.state
        if result.config_changed:
            self._write_config(model, spec, batching_json, result.windows)
        self._write_status(model, body, result)
        for event in result.events:
            ctrl.post_event(model, event)
        for r in result.results:
            log.info("%s/%s %s: %s", namespace, name, r.arch,
                     policy.describe(r.decision, r.observation, policy.Bounds.from_serving(spec.serving), "tuned"))
        return result

    def _write_config(self, model: render.ModelRef, spec: OptimizedModelSpec, batching_json: str | None,
                      windows: dict[str, float]) -> None:
        current = json.loads(batching_json) if batching_json else {}
        config = render.batching_config(spec, current.get("maxWaitMs"),
                                        {**(current.get("maxWaitMsByArch") or {}), **windows})
        cm = render.batching_configmap(model, config)
        try:
            # remembered: the reconcile must not put back the old windows before the watch shows them
            self.ctrl.memory.wrote(self.ctrl.kube.apply(cm) or cm)
        except KubeError as exc:
            log.warning("%s/%s: batching ConfigMap not written: %s", model.namespace, model.name, exc)

    def _write_status(self, model: render.ModelRef, body: Mapping, result: Pass) -> None:
        ctrl = self.ctrl
        status = ctrl.status_of(body)
        old = cond.get(status.get("conditions"), "Tuned")
        tuned = cond.merge_conditions([old] if old else [], [result.condition],
                                      body["metadata"].get("generation"), cond.now_iso())[0]
        # replaced in place (or appended) so the reconcile's list order, and so its change check, hold
        conditions = [tuned if c.get("type") == "Tuned" else c for c in status.get("conditions") or []]
        if old is None:
            conditions.append(tuned)
        ctrl.memory.tuned(model.uid, tuned)
        if old is not None and old.get("status") != tuned["status"] and tuned["status"] == "False":
            ctrl.post_event(model, Event("Warning", tuned["reason"], tuned["message"]))
        patch = {"status": {"conditions": conditions, "serving": result.serving}}
        try:
            ctrl.kube.merge_patch(object_path(OM_API, PLURAL, model.namespace, model.name, "status"), patch)
        except KubeError as exc:
            log.warning("%s/%s: tuning status not written: %s", model.namespace, model.name, exc)
