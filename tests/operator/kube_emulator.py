"""A small Kubernetes API emulator on top of kmock, for running kopf over real HTTP.

kmock.KubernetesEmulator stores objects and streams watch events, but treats a
PATCH as a plain dict merge. This subclass adds what the operator and kopf rely on:

- server-set metadata: uid, resourceVersion (one global counter), creationTimestamp,
  generation (starts at 1, bumped only when `spec` changes), namespace from the URL;
- PATCH by content type: JSON merge patch (RFC 7386; strategic merge is treated the
  same), JSON patch (RFC 6902, a failed `test` op answers 422 as kopf expects for
  its finalizer patches) and server-side apply (the applied object replaces the
  fields it names — enough for objects a single manager owns);
  a `metadata.resourceVersion` in a merge patch is a precondition (409 on mismatch);
- the status subresource: PATCH …/status changes only status, a PATCH of the main
  resource never does (except for kinds without a status subresource); a Job status
  is validated as the API server does (a finished Job needs startTime, Complete needs
  completionTime and SuccessCriteriaMet, Failed needs FailureTarget: 422 otherwise);
- list and watch with `labelSelector` (=, ==, !=, exists, !exists, in, notin);
- deletion: with finalizers a deletionTimestamp, without them removal, and then
  the garbage collector: objects whose ownerReferences point at a removed uid go too;
- fault injection: `fail(method, plural, status, times, subresource)` answers the
  next matching requests with an error (409s for the retry tests);
- helpers the tests use to act as kubelet / the Job controller / an admin
  (`put`, `patch_status`, `remove`), which go through the same code and emit
  watch events, unlike writing `kmock.objects` directly.

Everything else (discovery, fetch) is kmock's own.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, rendering

STATUSLESS = {"configmaps", "secrets", "events", "serviceaccounts", "namespaces"}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}

RESOURCES = {
    "v1/nodes": dict(namespaced=False, kind="Node", subresources={"status"}),
    "v1/pods": dict(namespaced=True, kind="Pod", subresources={"status"}),
    "v1/services": dict(namespaced=True, kind="Service", subresources={"status"}),
    "v1/configmaps": dict(namespaced=True, kind="ConfigMap"),
    "v1/secrets": dict(namespaced=True, kind="Secret"),
    "v1/events": dict(namespaced=True, kind="Event"),
    "v1/namespaces": dict(namespaced=False, kind="Namespace"),
    "batch/v1/jobs": dict(namespaced=True, kind="Job", subresources={"status"}),
    "apps/v1/deployments": dict(namespaced=True, kind="Deployment", subresources={"status", "scale"}),
    "optimodel.io/v1alpha1/optimizedmodels": dict(namespaced=True, kind="OptimizedModel",
                                                   singular="optimizedmodel", subresources={"status"}),
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def validate_job_status(status: dict) -> None:
    """The rules a Kubernetes >= 1.31 API server applies to a Job status update (422 otherwise)."""
    true = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
    problems = []
    if "Complete" in true:
        if not status.get("completionTime"):
            problems.append("status.completionTime: Required value: when the Complete condition is True")
        if "SuccessCriteriaMet" not in true:
            problems.append("status.conditions: Invalid value: cannot set Complete=True condition without "
                            "the SuccessCriteriaMet=True condition")
    elif status.get("completionTime"):
        problems.append("status.completionTime: Invalid value: can only be set when the Job is Complete")
    if "Failed" in true and "FailureTarget" not in true:
        problems.append("status.conditions: Invalid value: cannot set Failed=True condition without "
                        "the FailureTarget=True condition")
    if true & {"Complete", "Failed"}:
        if not status.get("startTime"):
            problems.append("status.startTime: Required value: startTime is required for finished Jobs")
        if status.get("active"):
            problems.append("status.active: Invalid value: must be 0 for a finished Job")
    if problems:
        raise ApiError(422, "Invalid", "Job.batch is invalid: " + "; ".join(problems))


_REQ = re.compile(r"^\s*([\w./-]+)\s*(in|notin)\s*\(([^)]*)\)\s*$")


def selector_matches(selector: str | None, labels: dict) -> bool:
    if not selector:
        return True
    labels = labels or {}
    # split on commas outside parentheses
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in filter(None, (p.strip() for p in parts)):
        if m := _REQ.match(part):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif "!=" in part:
            key, value = part.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif part.startswith("!"):
            if part[1:] in labels:
                return False
        elif part not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _rv: int = attrs.field(default=0, init=False)
    _faults: list = attrs.field(factory=list, init=False)
    _held: dict = attrs.field(factory=dict, init=False)  # plural -> released when set

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)

    # ---- test controls -----------------------------------------------------------------
    def fail(self, method: str, plural: str, status: int = 409, times: int = 1, subresource: str | None = None,
             reason: str = "Conflict", message: str = "injected by the test") -> None:
        self._faults.append({"method": method.upper(), "plural": plural, "status": status, "times": times,
                             "subresource": subresource, "reason": reason, "message": message})

    def hold_watch(self, plural: str) -> asyncio.Event:
        """Watch lag: events of this resource reach no watcher until the returned event is set
        (writes and reads answer at once, as on a real API server whose watch cache lags)."""
        gate = self._held[plural] = asyncio.Event()
        return gate

    def count(self, method: str, plural: str, subresource: str | None = None) -> int:
        """How many requests of this method went to this resource."""
        return sum(1 for r in self._requests
                   if r.method is not None and r.method.value.upper() == method.upper()
                   and r.resource is not None and r.resource.plural == plural
                   and (subresource is None or r.subresource == subresource))

    def live(self, resource: str, namespace: str | None = None) -> list[dict]:
        res = kmock.resource(resource)
        return [obj.raw for (r, ns, _), obj in self.objects.items()
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    async def put(self, resource: str, obj: dict) -> dict:
        """Create an object (as an admin or a controller would)."""
        async with self._lock:
            return await self._create(kmock.resource(resource), obj["metadata"].get("namespace"), obj)

    async def patch_status(self, resource: str, namespace: str | None, name: str, status: dict) -> dict:
        """Merge-patch an object's status (as kubelet or a built-in controller would)."""
        async with self._lock:
            return await self._patch(kmock.resource(resource), namespace, name, "status",
                                     {"status": status}, "application/merge-patch+json")

    async def patch(self, resource: str, namespace: str | None, name: str, patch: dict) -> dict:  # type: ignore[override]
        async with self._lock:
            return await self._patch(kmock.resource(resource), namespace, name, None, patch,
                                     "application/merge-patch+json")

    async def remove(self, resource: str, namespace: str | None, name: str) -> None:
        async with self._lock:
            await self._delete(kmock.resource(resource), namespace, name)

    # ---- request handling -----------------------------------------------------------------
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action is None or request.resource.plural is None:
            return await super()._handle(request)
        try:
            self._inject_fault(request)
            if request.action == enums.action.WATCH:
                return await super()._handle(request)  # → _serve_watch below
            if request.action == enums.action.LIST:
                return self._json(self._list(request))
            if request.action == enums.action.FETCH:
                obj = self.get_raw(request)
                return self._json(obj)
            async with self._lock:
                if request.action == enums.action.CREATE:
                    return self._json(await self._create(request.resource, request.namespace, request.data), 201)
                if request.action == enums.action.UPDATE:
                    ctype = request.headers.get("Content-Type", "application/merge-patch+json")
                    params = dict(request.params)
                    return self._json(await self._patch(request.resource, request.namespace, request.name,
                                                        request.subresource, request.data, ctype, params))
                if request.action == enums.action.DELETE:
                    return self._json(await self._delete(request.resource, request.namespace, request.name))
        except ApiError as exc:
            return self._json({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": exc.status,
                               "reason": exc.reason, "message": exc.message}, exc.status)
        return await super()._handle(request)

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=json.dumps(data), status=status, content_type="application/json")

    def _inject_fault(self, request: rendering.Request) -> None:
        for fault in self._faults:
            if (fault["times"] > 0 and request.method.value.upper() == fault["method"]
                    and request.resource.plural == fault["plural"]
                    and (fault["subresource"] is None or fault["subresource"] == request.subresource)):
                fault["times"] -= 1
                raise ApiError(fault["status"], fault["reason"], fault["message"])

    def get_raw(self, request: rendering.Request) -> dict:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise ApiError(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        return self.objects[key].raw

    def _visible(self, request: rendering.Request, resource, namespace, obj: dict) -> bool:
        return (resource == request.resource
                and (request.namespace is None or namespace == request.namespace)
                and selector_matches(request.params.get("labelSelector"), obj.get("metadata", {}).get("labels")))

    def _list(self, request: rendering.Request) -> dict:
        items = [obj.raw for (res, ns, _), obj in self.objects.items()
                 if not obj.deleted and self._visible(request, res, ns, obj.raw)]
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_watch(self, request: rendering.Request):
        yield b""
        async with self._lock:
            events = [{"type": "ADDED", "object": obj.raw} for (res, ns, _), obj in self.objects.items()
                      if not obj.deleted and self._visible(request, res, ns, obj.raw)]
            mark = await self._buses[request.resource].mark()  # no event slips between the snapshot and the stream
        for event in events:
            yield event
        async for event in mark:
            gate = self._held.get(request.resource.plural)
            if gate is not None:
                await gate.wait()
            meta = event["object"].get("metadata", {})
            if self._visible(request, request.resource, meta.get("namespace"), event["object"]):
                yield event

    # ---- mutations (called with the lock held) ---------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _namespaced(self, resource) -> bool:
        try:
            return self.resources[resource].namespaced is not False
        except KeyError:
            return True

    async def _emit(self, resource, type_: str, obj: dict) -> None:
        await self._buses[resource].put({"type": type_, "object": copy.deepcopy(obj)})

    async def _create(self, resource, namespace: str | None, data: dict) -> dict:
        obj = copy.deepcopy(data or {})
        meta = obj.setdefault("metadata", {})
        namespace = namespace or meta.get("namespace")
        if namespace and self._namespaced(resource):
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (resource, namespace, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise ApiError(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists")
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        await self._emit(resource, "ADDED", obj)
        return obj

    async def _patch(self, resource, namespace, name, subresource, patch, ctype: str,
                     params: dict | None = None) -> dict:
        key = (resource, namespace, name)
        exists = key in self.objects and not self.objects[key].deleted
        if "apply-patch" in ctype and not exists and subresource is None:
            return await self._create(resource, namespace, patch)
        if not exists:
            raise ApiError(404, "NotFound", f"{resource.plural} {name!r} not found")
        current = copy.deepcopy(self.objects[key].raw)
        if "json-patch" in ctype:
            try:
                new = jsonpatch.apply_patch(current, patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise ApiError(422, "Invalid", f"the test operation failed: {exc}") from None
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", str(exc)) from None
        elif "apply-patch" in ctype:
            applied = copy.deepcopy(patch)
            applied_meta = applied.pop("metadata", {})
            new = {**{k: v for k, v in current.items() if k in ("metadata", "status")}, **applied}
            new["metadata"] = {**current["metadata"], **{k: v for k, v in applied_meta.items()
                                                         if k not in ("uid", "resourceVersion", "generation")}}
        else:
            wanted_rv = ((patch or {}).get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified; please apply your changes "
                                                "to the latest version and try again")
            new = merge_patch(current, patch)
        has_status = resource.plural not in STATUSLESS
        if subresource == "status":
            new = {**current, "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
            if resource.plural == "jobs":
                validate_job_status(new.get("status") or {})
        elif has_status:
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in current:
                new["status"] = current["status"]
        # the server owns identity and bookkeeping
        for field in ("uid", "name", "namespace", "creationTimestamp", "generation", "deletionTimestamp"):
            if field in current["metadata"]:
                new.setdefault("metadata", {})[field] = current["metadata"][field]
            else:
                new.setdefault("metadata", {}).pop(field, None)
        if new == current:
            return current
        if new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key].history.append(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._erase(resource, key)
        else:
            await self._emit(resource, "MODIFIED", new)
        return new

    async def _delete(self, resource, namespace, name) -> dict:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise ApiError(404, "NotFound", f"{resource.plural} {name!r} not found")
        current = self.objects[key].raw
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["resourceVersion"] = self._next_rv()
                self.objects[key].history.append(new)
                await self._emit(resource, "MODIFIED", new)
                return new
            return current
        await self._erase(resource, key)
        return current

    async def _erase(self, resource, key) -> None:
        """Remove the object, then garbage-collect what it owned (background propagation)."""
        obj = self.objects[key].raw
        self.objects[key].delete()
        await self._emit(resource, "DELETED", obj)
        uid = obj["metadata"].get("uid")
        for (res, ns, name), child in list(self.objects.items()):
            if child.deleted:
                continue
            owners = child.raw.get("metadata", {}).get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                await self._delete(res, ns, name)
