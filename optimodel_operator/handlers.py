"""kopf handlers: thin. They keep indexes of what exists and tell the Controller which model to look at.

Nothing here decides anything; see reconcile.py. No handler requires a finalizer,
so deleting an OptimizedModel is plain garbage collection of its children.
"""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

from optimodel.spec import API_GROUP, API_VERSION, PLURAL

from optimodel_operator import discovery, render
from optimodel_operator.controller import Controller
from optimodel_operator.kube import Kube, load_configuration
from optimodel_operator.reconcile import DeploymentView, JobView, PodView
from optimodel_operator.settings import Settings
from optimodel_operator.tuner import Tuner

log = logging.getLogger(__name__)
OM = (API_GROUP, API_VERSION, PLURAL)
INDEXES = ("om_index", "node_index", "job_index", "pod_index", "deployment_index", "service_index", "batching_index")
MINE = {render.L_MANAGED_BY: render.MANAGED_BY}


def _with(component: str) -> dict:
    return {**MINE, render.L_COMPONENT: component}


@kopf.on.login()
def login(**kwargs):
    # kopf's own readers look at $KUBECONFIG when called, not when kubernetes was imported
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger, **kwargs) -> None:
    cfg = Settings.from_env(os.environ)
    settings.posting.reporting_component = render.MANAGED_BY
    settings.persistence.finalizer = "optimodel.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="optimodel.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="optimodel.io")
    settings.posting.enabled = False  # events are posted by the Controller, on transitions only
    # least-privilege RBAC grants no cluster-wide CRD/namespace watch: resolve resources once at start
    settings.scanning.disabled = True
    # only the operator's own children are streamed, not every Pod of the cluster
    for resource in ("jobs", "pods", "deployments", "services", "configmaps"):
        settings.watching.label_selectors[resource] = render.SELECTOR
    loop = asyncio.get_running_loop()
    kube = await loop.run_in_executor(None, lambda: Kube(load_configuration(cfg.kubeconfig)))
    ctrl = Controller(cfg, kube, {name: kwargs[name] for name in INDEXES})
    memo.ctrl = ctrl
    memo.resync = asyncio.create_task(ctrl.resync_forever(), name="optimodel resync")
    memo.tuner = asyncio.create_task(Tuner(ctrl).run_forever(), name="optimodel tuner")
    logger.info("optimodel operator: store %s, builder %s, serving %s, resync %ss",
                cfg.store_uri, cfg.builder_image, cfg.serving_image, cfg.resync_seconds)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_) -> None:
    for task in (getattr(memo, "resync", None), getattr(memo, "tuner", None)):
        if task is not None:
            task.cancel()
    ctrl = getattr(memo, "ctrl", None)
    if ctrl is not None:
        ctrl.close()


# ---- indexes: what exists, kept in memory from the watch streams ------------------------

@kopf.index(*OM)
async def om_index(namespace, name, body, **_):
    return {(namespace, name): {k: dict(body.get(k) or {}) for k in ("metadata", "spec", "status")}}


@kopf.index("nodes")
async def node_index(body, **_):
    target = discovery.node_target(body)
    # {} rather than None: kopf keeps the old entry on None, and a node going NotReady must drop out
    return {"gpu": target} if target is not None else {}


@kopf.index("batch", "v1", "jobs", labels=_with(render.BUILDER))
async def job_index(namespace, labels, body, **_):
    return {(namespace, labels.get(render.L_MODEL)): JobView.from_job(body)}


@kopf.index("pods", labels=_with(render.BUILDER))
async def pod_index(namespace, body, **_):
    pod = PodView.from_pod(body)
    return {(namespace, pod.job): pod}


@kopf.index("apps", "v1", "deployments", labels=_with(render.SERVER))
async def deployment_index(namespace, labels, body, **_):
    return {(namespace, labels.get(render.L_MODEL)): DeploymentView.from_deployment(body)}


@kopf.index("services", labels=_with(render.SERVICE))
async def service_index(namespace, labels, annotations, **_):
    return {(namespace, labels.get(render.L_MODEL)): annotations.get(render.A_HASH, "")}


@kopf.index("configmaps", labels=_with(render.BATCHING))
async def batching_index(namespace, labels, body, **_):
    return {(namespace, labels.get(render.L_MODEL)): (body.get("data") or {}).get("batching.json", "")}


# ---- triggers: which model to look at ------------------------------------------------------

@kopf.on.event(*OM)
async def model_changed(type, namespace, name, meta, memo, **_):
    ctrl: Controller = memo.ctrl
    ctrl.indexed = True
    if type == "DELETED":
        ctrl.forget(namespace, name, meta.get("uid", ""))
        return
    if meta.get("deletionTimestamp"):
        return
    # status-only writes (our own, the tuner's) keep the generation: nothing to decide; a new
    # rebuild annotation value does not bump it either but asks for a retry
    seen = (meta.get("generation"), (meta.get("annotations") or {}).get(render.A_REBUILD))
    if type == "MODIFIED" and ctrl.seen_generation.get(meta.get("uid")) == seen:
        return
    ctrl.seen_generation[meta.get("uid")] = seen
    ctrl.trigger(namespace, name)


@kopf.on.event("nodes")
async def node_changed(memo, **_):
    ctrl: Controller = memo.ctrl
    ctrl.indexed = True
    if ctrl.update_fleet():
        ctrl.trigger_all()


@kopf.on.event("batch", "v1", "jobs", labels=_with(render.BUILDER))
@kopf.on.event("pods", labels=_with(render.BUILDER))
@kopf.on.event("apps", "v1", "deployments", labels=_with(render.SERVER))
@kopf.on.event("services", labels=_with(render.SERVICE))
@kopf.on.event("configmaps", labels=_with(render.BATCHING))
async def child_changed(resource, namespace, name, labels, memo, **_):
    ctrl: Controller = memo.ctrl
    ctrl.indexed = True
    model = labels.get(render.L_MODEL)
    if model:
        ctrl.memory.watched(resource.kind, namespace, model, name)
        ctrl.trigger(namespace, model)
