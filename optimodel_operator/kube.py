"""A thin JSON client over the official kubernetes client's transport.

The typed API classes want model objects; the operator renders plain dicts, so
requests go through ApiClient.param_serialize/call_api (kubeconfig, in-cluster
tokens, TLS all from the official client) with dict bodies. Writes retry on
409 Conflict and on 429/5xx with a short backoff; a create that finds the
object already there is reported, not retried, because for Jobs that is the
"never two Jobs for one key" guarantee at work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Iterable
from urllib.parse import quote

import kubernetes

log = logging.getLogger(__name__)

FIELD_MANAGER = "optimodel-operator"
MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"
RETRY_STATUSES = {409, 429, 500, 502, 503, 504}

# group/version/plural of every kind the operator writes
KINDS = {
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
}


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{quote(namespace)}"
    return f"{base}/{plural}"


def object_path(api_version: str, plural: str, namespace: str | None, name: str, subresource: str = "") -> str:
    path = f"{collection_path(api_version, plural, namespace)}/{quote(name)}"
    return f"{path}/{subresource}" if subresource else path


def path_of(obj: dict) -> tuple[str, str]:
    """(collection path, object path) of a rendered object."""
    plural = KINDS[(obj["apiVersion"], obj["kind"])]
    meta = obj["metadata"]
    return (collection_path(obj["apiVersion"], plural, meta.get("namespace")),
            object_path(obj["apiVersion"], plural, meta.get("namespace"), meta["name"]))


def load_configuration(kubeconfig: str = "") -> kubernetes.client.Configuration:
    """In-cluster config, else the kubeconfig Settings names (empty: ~/.kube/config)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig or None, client_configuration=config)
    return config


class Kube:
    def __init__(self, configuration: kubernetes.client.Configuration | None = None,
                 attempts: int = 5, backoff: float = 0.2):
        self.api = kubernetes.client.ApiClient(configuration or load_configuration())
        self.attempts, self.backoff = attempts, backoff
        self.requests = 0  # for the bench: requests this client made
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self.api.close()

    # -- raw -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, params: Iterable[tuple[str, str]] = (),
                content_type: str = "application/json") -> dict | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method_, url, headers, body_, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=list(params) or None,
            header_params=headers, body=body, auth_settings=["BearerToken"])
        with self._count_lock:
            self.requests += 1
        response = self.api.call_api(method_, url, headers, body_, post)
        data = response.read()
        text = data.decode() if isinstance(data, bytes) else (data or "")
        if response.status >= 400:
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {}
            raise KubeError(response.status, payload.get("reason") or str(response.reason or ""),
                            payload.get("message") or text[:500])
        return json.loads(text) if text else None

    def _retrying(self, fn, what: str):
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except KubeError as exc:
                if exc.already_exists or exc.status not in RETRY_STATUSES or attempt == self.attempts:
                    raise
                log.info("%s: %s; retry %d/%d", what, exc, attempt, self.attempts - 1)
                time.sleep(self.backoff * attempt)

    # -- verbs -----------------------------------------------------------------------
    def get(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, obj: dict) -> dict | None:
        """Create obj; None when it already exists."""
        collection, _ = path_of(obj)
        try:
            return self._retrying(lambda: self.request("POST", collection, obj), f"create {collection}")
        except KubeError as exc:
            if exc.already_exists:
                return None
            raise

    def apply(self, obj: dict) -> dict | None:
        """Server-side apply of an object the operator owns whole."""
        _, path = path_of(obj)
        params = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self._retrying(lambda: self.request("PATCH", path, obj, params, APPLY), f"apply {path}")

    def merge_patch(self, path: str, patch: dict) -> dict | None:
        return self._retrying(lambda: self.request("PATCH", path, patch, (), MERGE), f"patch {path}")

    def delete(self, path: str, propagation: str = "Background") -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            self._retrying(lambda: self.request("DELETE", path, body), f"delete {path}")
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
