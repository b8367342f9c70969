"""The reconcile loop around the pure decisions: gather, decide, act, report.

One Controller per operator run (kept in kopf's memo). Its Scheduler (scheduler.py, event
loop only) says when a model is looked at; each pass, reconcile(), runs in a worker thread:
it reads what exists from kopf's in-memory indexes (no API reads per reconcile) and from
Memory (memory.py, under one lock), runs reconcile.decide, carries out the actions through
kube.Kube and writes status only when it changed. The tuner's passes run through the same
exclusive(): never beside a reconcile of the same model.

Children this process wrote are remembered until the watch shows an event of them. Not
for correctness: Job names are deterministic (a second create is answered AlreadyExists
and the Job read instead; the events that announce a create, BuildStarted and the like,
are posted only when it created) and a second server-side apply of the same object
changes nothing; tests/operator/test_controller.py runs reconciles with the watch held
back and the memory dropped to show it. They are remembered because bench/operator.py
measured the cost of forgetting: at 200 models each Deployment was applied twice and its
RollingOut event posted twice (29.4 instead of 23.7 requests per model), and one Job in
ten was created twice (10.4 instead of 10.0 requests per model until the Jobs). The
tuner's windows do need it: a reconcile re-renders the batching ConfigMap from what it
sees, and must not put the old windows back before the watch shows the tuner's write.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from optimodel.spec import API_GROUP, API_VERSION, KIND, PLURAL

from optimodel_operator import discovery, render
from optimodel_operator import status as cond
from optimodel_operator.kube import Kube, KubeError, collection_path, object_path
from optimodel_operator.memory import Memory
from optimodel_operator.reconcile import (Apply, CreateJob, DeleteJob, DeploymentView, Event, JobView, Observed,
                                          Scale, decide, is_quota, status_changed)
from optimodel_operator.scheduler import API_RETRY_SECONDS, Key, Scheduler
from optimodel_operator.settings import Settings

log = logging.getLogger(__name__)
OM_API = f"{API_GROUP}/{API_VERSION}"


def first(store) -> Any:
    for item in store or ():
        return item
    return None


class Controller:
    def __init__(self, settings: Settings, kube: Kube, indexes: Mapping[str, Any]):
        self.settings, self.kube, self.indexes = settings, kube, indexes
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
        self.scheduler = Scheduler(self._reconcile_in_pool, max_backoff=max(settings.resync_seconds, API_RETRY_SECONDS),
                                   concurrency=settings.workers)
        self.memory = Memory(pvc_root=settings.pvc_root)
        # owned by the event loop; worker threads read the dict it points to, which is never mutated
        self.fleet: dict | None = None
        self.indexed = False
        self.seen_generation: dict[str, tuple] = {}  # event loop only (model_changed)
        self.reconciles = 0  # event loop only
        self._model_locks: dict[Key, asyncio.Lock] = {}  # event loop only

    # ---- scheduling (event loop) ------------------------------------------------------------
    def trigger(self, namespace: str, name: str) -> None:
        self.scheduler.trigger((namespace, name))

    def trigger_all(self) -> None:
        for key in list(self.indexes["om_index"].keys()):
            self.scheduler.trigger(key)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """The model was deleted (its children go with it by ownerReferences): drop what was kept for it."""
        key = (namespace, name)
        self.scheduler.forget(key)
        self.memory.forget(key, uid)
        self.seen_generation.pop(uid, None)
        lock = self._model_locks.get(key)
        if lock is not None and not lock.locked():
            del self._model_locks[key]

    async def exclusive(self, key: Key, fn: Callable[..., Any], *args) -> Any:
        """Run fn in a worker thread while no other work on this model runs (reconcile or tuner)."""
        lock = self._model_locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _reconcile_in_pool(self, key: Key) -> float | None:
        if self.fleet is None:
            self.update_fleet()
        self.reconciles += 1
        return await self.exclusive(key, self.reconcile, *key, self.fleet or {})

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
        self.scheduler.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.kube.close()

    # ---- gather (worker thread) -----------------------------------------------------------
    def observe(self, model: render.ModelRef) -> Observed:
        idx, key = self.indexes, (model.namespace, model.name)
        obs = Observed(jobs={job.name: job for job in idx["job_index"].get(key, ())})
        for jname, obj in self.memory.written("Job", key).items():
            obs.jobs.setdefault(jname, JobView.from_job(obj))  # created a moment ago: Active
        for jname in obs.jobs:
            obs.pods[jname] = list(idx["pod_index"].get((model.namespace, jname), ()))
        obs.deployments = {dep.arch: dep for dep in idx["deployment_index"].get(key, ())}
        for obj in self.memory.written("Deployment", key).values():
            dep = DeploymentView.from_deployment(obj)
            obs.deployments[dep.arch] = dep
        obs.service_hash = first(idx["service_index"].get(key, ()))
        mine = self.memory.written("Service", key).get(render.service_name(model.name))
        if mine is not None:
            obs.service_hash = mine["metadata"]["annotations"][render.A_HASH]
        obs.batching_json = self.memory.batching_json(key, first(idx["batching_index"].get(key, ())))
        obs.refused = self.memory.refusals(key)
        return obs

    def status_of(self, body: Mapping) -> dict:
        return self.memory.status_of(body)

    def secret_exists(self, namespace: str, name: str) -> bool:
        return self.kube.get(object_path("v1", "secrets", namespace, name)) is not None

    # ---- the reconcile (worker thread) -----------------------------------------------------
    def reconcile(self, namespace: str, name: str, fleet: Mapping | None = None) -> float | None:
        """One pass; returns seconds after which to look again (a retry due), or None.
        Raises KubeError when an action failed, so the scheduler requeues with backoff."""
        body = first(self.indexes["om_index"].get((namespace, name), ()))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # gone or going: ownerReferences let the garbage collector take the children
        model = render.ModelRef.from_body(body)
        generation = body["metadata"].get("generation")
        status = self.status_of(body)
        decision = decide(model=model, raw_spec=body.get("spec"), generation=generation, status=status,
                          fleet=fleet if fleet is not None else (self.fleet or {}), observed=self.observe(model),
                          settings=self.settings, published=self.memory.is_published,
                          secret_exists=lambda s: self.secret_exists(namespace, s), now=cond.now_iso(),
                          rebuild=(body["metadata"].get("annotations") or {}).get(render.A_REBUILD))
        failed: KubeError | None = None
        refused = self.memory.refusals((namespace, name))
        events = list(decision.events)
        for action in decision.actions:
            child = _child_name(action)
            try:
                events += self.act(model, action)
                refused.pop(child, None)
            except KubeError as exc:
                if exc.status == 403 and is_quota(exc.message):
                    refused[child] = exc.message  # the next pass reports QuotaExceeded with this message
                log.warning("%s/%s: %s failed: %s", namespace, name, type(action).__name__, exc)
                events.append(_api_error(action, exc))
                failed = failed or exc
        self.memory.set_refusals((namespace, name), refused)
        patch = decision.patch  # the typed status becomes a dict here, at the API boundary
        if status_changed(status, patch):
            path = object_path(OM_API, PLURAL, namespace, name, "status")
            try:
                self.kube.merge_patch(path, {"status": patch})
                self.memory.wrote_status(model.uid, generation, patch)
            except KubeError as exc:
                if exc.status != 404:
                    raise
        for event in events:
            self.post_event(model, event)
        if failed is not None:
            raise failed
        return decision.requeue_after

    def act(self, model: render.ModelRef, action) -> list[Event]:
        """Carry out one action; the events it announces when it changed something."""
        ns = model.namespace
        if isinstance(action, CreateJob):
            # the Job first: its request ConfigMap is owned by it (a pod waits for the mount meanwhile)
            created = self.kube.create(action.job)
            job = created or self.kube.get(object_path("batch/v1", "jobs", ns, action.name))
            if job is None:  # it existed a moment ago and is gone (deleted meanwhile): try again soon
                raise KubeError(409, "Conflict", f"Job {action.name} already existed and is gone now")
            request = render.owned_by_job(action.request, job)
            if self.kube.create(request) is None:
                # left by an earlier Job of this name, which the garbage collector may still take
                self.kube.merge_patch(object_path("v1", "configmaps", ns, action.name),
                                      {"metadata": {"ownerReferences": request["metadata"]["ownerReferences"]},
                                       "data": request["data"]})
            self.memory.wrote(job)
            log.info("%s/%s: %s Job %s", ns, model.name, "created" if created else "found existing", action.name)
            return list(action.announce) if created else []
        if isinstance(action, DeleteJob):
            deleted = self.kube.delete(object_path("batch/v1", "jobs", ns, action.name))
            self.memory.watched("Job", ns, model.name, action.name)  # not to be seen as Active again
            return list(action.announce) if deleted else []
        if isinstance(action, Apply):
            self.memory.wrote(self.kube.apply(action.obj) or action.obj)
            return list(action.announce)
        if isinstance(action, Scale):
            scaled = self.kube.merge_patch(object_path("apps/v1", "deployments", ns, action.name),
                                           {"spec": {"replicas": action.replicas}})
            if scaled and scaled.get("kind") == "Deployment":
                self.memory.wrote(scaled)  # an applied copy of it must not bring the old replicas back
            return list(action.announce)
        raise TypeError(f"unknown action {action!r}")

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
