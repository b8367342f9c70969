"""The reconcile loop around the pure decisions: gather, decide, act, report.

One Controller per operator run (kept in kopf's memo), in three parts:

- Scheduler: the one place that says when a model is looked at: now (a watch event),
  after a delay (a retry due later: requeue-after), with doubling backoff (a reconcile
  that failed on an API error), or at the resync. It lives on the event loop and only the
  event loop touches it; a model is never reconciled twice at once, and triggers that
  arrive meanwhile fold into one more pass.
- reconcile(): one blocking pass in a worker thread. It reads what exists from kopf's
  in-memory indexes (no API reads per reconcile), runs reconcile.decide, carries out the
  actions through kube.Kube and writes status only when it changed.
- Memory: what this process wrote and the watches may not show yet (its last status, the
  tuner's Tuned condition, quota refusals, applied objects, published artifacts). Worker
  threads share it, so one lock guards every access.

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
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Mapping

from optimodel.artifact import is_published
from optimodel.spec import API_GROUP, API_VERSION, KIND, PLURAL

from optimodel_operator import discovery, render
from optimodel_operator import status as cond
from optimodel_operator.kube import Kube, KubeError, collection_path, object_path
from optimodel_operator.reconcile import (Apply, CreateJob, DeleteJob, DeploymentView, Event, JobView, Observed,
                                          Scale, decide, is_quota, status_changed)
from optimodel_operator.settings import Settings

log = logging.getLogger(__name__)
API_RETRY_SECONDS = 0.5  # first requeue after a failed reconcile, doubling up to the resync period
OM_API = f"{API_GROUP}/{API_VERSION}"
# status fields only this operator writes; the rest (Tuned, serving metrics) belongs to the tuner
OWNED_STATUS = ("observedGeneration", "engines")

Key = tuple[str, str]  # (namespace, name) of an OptimizedModel


def first(store) -> Any:
    for item in store or ():
        return item
    return None


class Scheduler:
    """When each model is looked at. Event loop only: no locks, because no thread touches it."""

    def __init__(self, work: Callable[[Key], Awaitable[float | None]], max_backoff: float,
                 first_backoff: float = API_RETRY_SECONDS, concurrency: int = 8):
        self.work, self.max_backoff, self.first_backoff = work, max_backoff, first_backoff
        # passes wait for a slot here, where triggers still fold into them, not in an executor's queue
        self.slots = asyncio.Semaphore(concurrency)
        self.running: dict[Key, asyncio.Task] = {}  # waiting for a slot or in a pass
        self.again: set[Key] = set()  # triggered after its pass began: one more pass after this one
        self.timers: dict[Key, asyncio.TimerHandle] = {}
        self.failures: dict[Key, int] = {}
        self.closed = False

    def trigger(self, key: Key, delay: float = 0.0) -> None:
        """Look at key now, or after delay seconds (the earliest asked for wins)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        timer = self.timers.get(key)
        if delay > 0:
            if timer is None or timer.when() > loop.time() + delay:
                if timer is not None:
                    timer.cancel()
                self.timers[key] = loop.call_later(delay, self._due, key)
            return
        if timer is not None:  # looking now answers what the timer would have asked
            timer.cancel()
            del self.timers[key]
        if key in self.running:
            self.again.add(key)
        else:
            self.running[key] = loop.create_task(self._run(key), name=f"reconcile {key[0]}/{key[1]}")

    def _due(self, key: Key) -> None:
        self.timers.pop(key, None)
        self.trigger(key)

    async def _run(self, key: Key) -> None:
        try:
            async with self.slots:
                while True:
                    self.again.discard(key)  # the pass reads what exists from here on
                    after = await self._once(key)
                    if after is not None:
                        self.trigger(key, after)
                    if key not in self.again or self.closed:
                        return
        finally:
            self.running.pop(key, None)

    async def _once(self, key: Key) -> float | None:
        try:
            after = await self.work(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self.failures[key] = self.failures.get(key, 0) + 1
            delay = min(self.first_backoff * 2 ** (failures - 1), self.max_backoff)
            log.warning("reconcile of %s/%s failed (%s); again in %.1f s", *key, exc, delay,
                        exc_info=not isinstance(exc, KubeError))
            return delay
        self.failures.pop(key, None)
        return after

    def close(self) -> None:
        self.closed = True
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        for task in self.running.values():
            task.cancel()


class Memory:
    """What this process wrote that the watches may not show yet. Shared by worker threads:
    every access holds the lock."""

    def __init__(self, pvc_root: str | None = None) -> None:
        self.pvc_root = pvc_root  # where this process finds pvc:// stores (Settings.pvc_root)
        self._lock = threading.Lock()
        self._status: dict[str, tuple[int | None, dict]] = {}  # uid -> (generation, status we wrote)
        self._tuned: dict[str, dict] = {}  # uid -> the Tuned condition the tuner wrote last
        self._refused: dict[Key, dict[str, str]] = {}  # model -> child name -> a quota's refusal
        self._written: dict[Key, dict[tuple[str, str], dict]] = {}  # model -> (kind, name) -> written, not watched
        self._published: set[str] = set()  # a published artifact never changes under its key

    def wrote_status(self, uid: str, generation: int | None, status: dict) -> None:
        with self._lock:
            self._status[uid] = (generation, status)

    def tuned(self, uid: str, condition: dict) -> None:
        with self._lock:
            self._tuned[uid] = condition

    def status_of(self, body: Mapping) -> dict:
        """The model's status as this process last wrote it (the watch may lag behind)."""
        status = dict(body.get("status") or {})
        uid = body["metadata"].get("uid", "")
        with self._lock:
            mine, tuned = self._status.get(uid), self._tuned.get(uid)
        if mine is not None and mine[0] == body["metadata"].get("generation"):
            _, written = mine
            for k in OWNED_STATUS:
                if k in written:
                    status[k] = written[k]
            others = [c for c in status.get("conditions") or [] if c.get("type") not in cond.OWNED]
            status["conditions"] = [c for c in written.get("conditions", []) if c.get("type") in cond.OWNED] + others
        if tuned is not None:
            status["conditions"] = [tuned if c.get("type") == "Tuned" else c for c in status.get("conditions") or []]
            if not any(c.get("type") == "Tuned" for c in status["conditions"]):
                status["conditions"].append(tuned)
        return status

    def refusals(self, key: Key) -> dict[str, str]:
        with self._lock:
            return dict(self._refused.get(key, {}))

    def set_refusals(self, key: Key, refused: Mapping[str, str]) -> None:
        with self._lock:
            self._refused[key] = dict(refused)

    def wrote(self, obj: dict) -> None:
        """A child this process created or applied (the API's answer, or what it sent)."""
        meta = obj["metadata"]
        with self._lock:
            mine = self._written.setdefault((meta["namespace"], meta["labels"][render.L_MODEL]), {})
            mine[(obj["kind"], meta["name"])] = obj

    def watched(self, kind: str, namespace: str, model: str, name: str) -> None:
        """The watch delivered an event of this object: the index is as new as our write now."""
        with self._lock:
            mine = self._written.get((namespace, model))
            if mine is not None:
                mine.pop((kind, name), None)
                if not mine:
                    del self._written[(namespace, model)]

    def written(self, kind: str, key: Key) -> dict[str, dict]:
        """Objects of this kind and model written and not yet watched, by name."""
        with self._lock:
            return {name: obj for (k, name), obj in self._written.get(key, {}).items() if k == kind}

    def batching_json(self, key: Key, seen: str | None) -> str | None:
        """The batching.json to plan from: the last one applied until the watch shows it."""
        mine = self.written("ConfigMap", key).get(render.batching_name(key[1]))
        return seen if mine is None else mine["data"][render.BATCHING_FILE]

    def is_published(self, uri: str) -> bool:
        with self._lock:
            if uri in self._published:
                return True
        if is_published(uri, pvc_root=self.pvc_root):
            with self._lock:
                self._published.add(uri)
            return True
        return False


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
