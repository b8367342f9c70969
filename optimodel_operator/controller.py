"""The reconcile loop around the pure decisions: gather, decide, act, report.

One Controller per operator run (kept in kopf's memo). It reads what exists from
kopf's in-memory indexes (no API reads per reconcile), overlays its own recent
writes the watches have not delivered yet, runs reconcile.decide, carries out
the actions through kube.Kube and writes status only when it changed. Reconciles
of one model never overlap (a lock per model) and triggers that arrive while one
is queued fold into it. A reconcile that failed (an API error) is requeued with
doubling backoff, and one whose decision has a retry due later asks to be looked
at again then (requeue-after): neither waits for the resync.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

from optimodel.artifact import is_published
from optimodel.spec import API_GROUP, API_VERSION, KIND, PLURAL

from optimodel_operator import discovery, render
from optimodel_operator import status as cond
from optimodel_operator.kube import Kube, KubeError, collection_path, object_path
from optimodel_operator.reconcile import (Apply, CreateJob, DeleteJob, DeploymentView, Event, JobView, Observed,
                                          Scale, decide, is_quota, status_changed)
from optimodel_operator.settings import Settings

log = logging.getLogger(__name__)
RECENT_SECONDS = 60.0  # how long a write the watch has not shown yet is trusted
API_RETRY_SECONDS = 0.5  # first requeue after a failed reconcile, doubling up to the resync period
OM_API = f"{API_GROUP}/{API_VERSION}"
# status fields only this operator writes; the rest (Tuned, serving metrics) belongs to the tuner
OWNED_STATUS = ("observedGeneration", "engines")


def first(store) -> Any:
    for item in store or ():
        return item
    return None


class Controller:
    def __init__(self, settings: Settings, kube: Kube, indexes: Mapping[str, Any]):
        self.settings, self.kube, self.indexes = settings, kube, indexes
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
        self.locks: dict[tuple, threading.Lock] = defaultdict(threading.Lock)
        self.queued: set[tuple] = set()
        self.queued_lock = threading.Lock()
        self.fleet: dict | None = None
        self.written: dict[str, tuple[int | None, dict]] = {}  # uid -> (generation, status we wrote)
        # (kind, ns, name) -> (when, object written); written by worker threads, dropped by the
        # event loop's watch handlers: every access holds recent_lock
        self.recent: dict[tuple, tuple[float, dict]] = {}
        self.recent_lock = threading.Lock()
        self.published: set[str] = set()
        self.indexed = False
        self.seen_generation: dict[str, int | None] = {}
        self.reconciles = 0
        self.tuned: dict[str, dict] = {}  # uid -> the Tuned condition the tuner wrote last (watch may lag)
        self.refused: dict[tuple, dict[str, str]] = {}  # (ns, model) -> child name -> quota refusal
        self.failures: dict[tuple, int] = {}  # consecutive failed reconciles per model (backoff)
        self.timers: dict[tuple, threading.Timer] = {}  # requeue-after per model
        self.closed = False

    # ---- scheduling -------------------------------------------------------------------
    def trigger(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self.queued_lock:
            if key in self.queued or self.closed:
                return
            self.queued.add(key)
        self.pool.submit(self._run, key)

    def trigger_all(self) -> None:
        for (namespace, name) in list(self.indexes["om_index"].keys()):
            self.trigger(namespace, name)

    def _run(self, key: tuple) -> None:
        with self.locks[key]:
            with self.queued_lock:
                self.queued.discard(key)
            try:
                requeue = self.reconcile(*key)
            except Exception as exc:
                failures = self.failures.get(key, 0) + 1
                self.failures[key] = failures
                delay = min(API_RETRY_SECONDS * 2 ** (failures - 1), self.settings.resync_seconds)
                log.warning("reconcile of %s/%s failed (%s); again in %.1f s", *key, exc, delay,
                            exc_info=not isinstance(exc, KubeError))
                self.requeue(key, delay)
                return
            self.failures.pop(key, None)
            if requeue is not None:
                self.requeue(key, requeue)

    def requeue(self, key: tuple, delay: float) -> None:
        """Look at this model again after delay seconds (the earliest asked for wins)."""
        due = time.monotonic() + delay
        with self.queued_lock:
            timer = self.timers.get(key)
            if timer is not None and timer.due <= due and timer.is_alive():
                return
            if timer is not None:
                timer.cancel()
            timer = threading.Timer(delay, self._requeued, (key,))
            timer.due, timer.daemon = due, True
            self.timers[key] = timer
        timer.start()

    def _requeued(self, key: tuple) -> None:
        with self.queued_lock:
            self.timers.pop(key, None)
        self.trigger(*key)

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            if self.indexed:
                self.update_fleet()
                self.trigger_all()

    def update_fleet(self) -> bool:
        fleet = discovery.fleet(self.indexes["node_index"].get("gpu", ()))
        changed = fleet != self.fleet
        if changed:
            log.info("GPU fleet: %s", ", ".join(f"{a} ({t.product or '?'})" for a, t in fleet.items()) or "none")
            self.fleet = fleet
        return changed

    def close(self) -> None:
        with self.queued_lock:
            self.closed = True  # a requeue timer that fires now finds nothing to schedule on
            for timer in self.timers.values():
                timer.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.kube.close()

    # ---- gather -----------------------------------------------------------------------
    def remember(self, obj: dict) -> None:
        meta = obj["metadata"]
        with self.recent_lock:
            self.recent[(obj["kind"], meta["namespace"], meta["name"])] = (time.monotonic(), obj)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The watch delivered an event for this object: trust the indexes for it again."""
        with self.recent_lock:
            self.recent.pop((kind, namespace, name), None)

    def recent_of(self, kind: str, namespace: str, uid: str) -> dict[str, dict]:
        """Objects of this kind the model's last reconciles wrote, by name (stale ones forgotten)."""
        out, horizon = {}, time.monotonic() - RECENT_SECONDS
        with self.recent_lock:
            items = list(self.recent.items())
        for key, (when, obj) in items:
            if when < horizon:
                self.forget(*key)
            elif key[0] == kind and key[1] == namespace and obj["metadata"]["ownerReferences"][0]["uid"] == uid:
                out[key[2]] = obj
        return out

    def observe(self, model: render.ModelRef) -> Observed:
        idx, ns, name = self.indexes, model.namespace, model.name
        obs = Observed()
        for job in idx["job_index"].get((ns, name), ()):
            obs.jobs[job.name] = job
            self.forget("Job", ns, job.name)
        for jname, obj in self.recent_of("Job", ns, model.uid).items():
            labels = obj["metadata"]["labels"]
            obs.jobs.setdefault(jname, JobView(name=jname, arch=labels[render.L_ARCH],
                                               cache_key=labels[render.L_KEY], state="Active"))
        for jname in obs.jobs:
            obs.pods[jname] = list(idx["pod_index"].get((ns, jname), ()))
        for dep in idx["deployment_index"].get((ns, name), ()):
            obs.deployments[dep.arch] = dep
        by_name = {d.name: d for d in obs.deployments.values()}
        for dname, obj in self.recent_of("Deployment", ns, model.uid).items():
            mine = DeploymentView.from_deployment(obj)
            seen = by_name.get(dname)
            if seen is not None and (seen.config_hash, seen.replicas) == (mine.config_hash, mine.replicas):
                self.forget("Deployment", ns, dname)  # the watch caught up
            else:
                obs.deployments[mine.arch] = mine
        obs.refused = dict(self.refused.get((ns, name), {}))
        obs.service_hash = first(idx["service_index"].get((ns, name), ()))
        obs.batching_json = first(idx["batching_index"].get((ns, name), ()))
        mine = self.recent_of("Service", ns, model.uid).get(render.service_name(name))
        if mine is not None:
            value = mine["metadata"]["annotations"][render.A_HASH]
            if obs.service_hash == value:
                self.forget("Service", ns, render.service_name(name))
            obs.service_hash = value
        mine = self.recent_of("ConfigMap", ns, model.uid).get(render.batching_name(name))
        if mine is not None:
            value = mine["data"][render.BATCHING_FILE]
            if obs.batching_json == value:
                self.forget("ConfigMap", ns, render.batching_name(name))
            obs.batching_json = value
        return obs

    def status_of(self, body: Mapping) -> dict:
        status = dict(body.get("status") or {})
        uid = body["metadata"].get("uid", "")
        mine = self.written.get(uid)
        if mine is not None and mine[0] == body["metadata"].get("generation"):
            _, written = mine
            for k in OWNED_STATUS:
                if k in written:
                    status[k] = written[k]
            others = [c for c in status.get("conditions") or [] if c.get("type") not in cond.OWNED]
            status["conditions"] = [c for c in written.get("conditions", []) if c.get("type") in cond.OWNED] + others
        tuned = self.tuned.get(uid)
        if tuned is not None:
            status["conditions"] = [tuned if c.get("type") == "Tuned" else c for c in status.get("conditions") or []]
            if not any(c.get("type") == "Tuned" for c in status["conditions"]):
                status["conditions"].append(tuned)
        return status

    def is_published(self, uri: str) -> bool:
        if uri in self.published:
            return True
        if is_published(uri):
            self.published.add(uri)  # a published artifact never changes under its key
            return True
        return False

    def secret_exists(self, namespace: str, name: str) -> bool:
        return self.kube.get(object_path("v1", "secrets", namespace, name)) is not None

    # ---- the reconcile ------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds after which to look again (a retry due), or None.
        Raises KubeError when an action failed, so the caller requeues with backoff."""
        body = first(self.indexes["om_index"].get((namespace, name), ()))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # gone or going: ownerReferences let the garbage collector take the children
        self.reconciles += 1
        if self.fleet is None:
            self.update_fleet()
        model = render.ModelRef.from_body(body)
        generation = body["metadata"].get("generation")
        status = self.status_of(body)
        decision = decide(model=model, raw_spec=body.get("spec"), generation=generation, status=status,
                          fleet=self.fleet or {}, observed=self.observe(model), settings=self.settings,
                          published=self.is_published, secret_exists=lambda s: self.secret_exists(namespace, s),
                          now=cond.now_iso(),
                          rebuild=(body["metadata"].get("annotations") or {}).get(render.A_REBUILD))
        failed: KubeError | None = None
        refused = self.refused.setdefault((namespace, name), {})
        for action in decision.actions:
            child = _child_name(action)
            try:
                self.act(model, action)
                refused.pop(child, None)
            except KubeError as exc:
                if exc.status == 403 and is_quota(exc.message):
                    refused[child] = exc.message  # the next pass reports QuotaExceeded with this message
                log.warning("%s/%s: %s failed: %s", namespace, name, type(action).__name__, exc)
                decision.events.append(_api_error(action, exc))
                failed = failed or exc
        if status_changed(status, decision.status):
            path = object_path(OM_API, PLURAL, namespace, name, "status")
            try:
                self.kube.merge_patch(path, {"status": decision.status})
                self.written[model.uid] = (generation, decision.status)
            except KubeError as exc:
                if exc.status != 404:
                    raise
        for event in decision.events:
            self.post_event(model, event)
        if failed is not None:
            raise failed
        return decision.requeue_after

    def act(self, model: render.ModelRef, action) -> None:
        ns = model.namespace
        if isinstance(action, CreateJob):
            # the Job first: its request ConfigMap is owned by it (a pod waits for the mount meanwhile)
            created = self.kube.create(action.job)
            job = created or self.kube.get(object_path("batch/v1", "jobs", ns, action.name))
            if job is None:  # it existed a moment ago and is gone (deleted meanwhile): try again soon
                raise KubeError(409, "Conflict", f"Job {action.name} already existed and is gone now")
            if job is not None:
                request = render.owned_by_job(action.request, job)
                if self.kube.create(request) is None:
                    # left by an earlier Job of this name, which the garbage collector may still take
                    self.kube.merge_patch(object_path("v1", "configmaps", ns, action.name),
                                          {"metadata": {"ownerReferences": request["metadata"]["ownerReferences"]},
                                           "data": request["data"]})
            self.remember(action.job)
            log.info("%s/%s: %s Job %s", ns, model.name, "created" if created else "found existing", action.name)
        elif isinstance(action, DeleteJob):
            self.kube.delete(object_path("batch/v1", "jobs", ns, action.name))
            self.forget("Job", ns, action.name)
        elif isinstance(action, Apply):
            self.kube.apply(action.obj)
            self.remember(action.obj)
        elif isinstance(action, Scale):
            self.kube.merge_patch(object_path("apps/v1", "deployments", ns, action.name),
                                  {"spec": {"replicas": action.replicas}})
            with self.recent_lock:
                mine = self.recent.get(("Deployment", ns, action.name))
                if mine is not None:
                    mine[1]["spec"]["replicas"] = action.replicas

    def post_event(self, model: render.ModelRef, event) -> None:
        now = cond.now_iso()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{model.name}.{uuid.uuid4().hex[:16]}", "namespace": model.namespace},
            "involvedObject": {"apiVersion": OM_API, "kind": KIND, "name": model.name,
                               "namespace": model.namespace, "uid": model.uid},
            "reason": event.reason, "message": event.message[:1024], "type": event.type,
            "source": {"component": render.MANAGED_BY}, "reportingComponent": render.MANAGED_BY,
            "reportingInstance": render.MANAGED_BY, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.kube.request("POST", collection_path("v1", "events", model.namespace), body)
        except KubeError as exc:
            log.debug("event %s not posted: %s", event.reason, exc)



def _child_name(action) -> str:
    return action.obj["metadata"]["name"] if isinstance(action, Apply) else action.name


def _api_error(action, exc: KubeError) -> Event:
    return Event("Warning", "ApiError", f"{type(action).__name__} failed: {exc}"[:1000])
