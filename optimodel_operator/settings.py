"""Operator settings, read once from environment variables at startup.

| variable | default | meaning |
|---|---|---|
| `OPTIMODEL_STORE_URI` | `pvc://optimodel-store/artifacts` | where engines are published: `<store>/<namespace>/<name>/<cacheKey>/` |
| `OPTIMODEL_BUILDER_IMAGE` | `ghcr.io/optimodel/builder:0.1.0` | image of the builder Job (`python -m builder_job`) |
| `OPTIMODEL_SERVING_IMAGE` | `ghcr.io/optimodel/serving:0.1.0` | image of the serving Deployments (`python -m serving_image`) |
| `OPTIMODEL_IMAGE_PULL_POLICY` | `IfNotPresent` | pull policy of both images |
| `OPTIMODEL_PROMETHEUS_URL` | empty | Prometheus base URL for the tuner (empty: no tuning) |
| `OPTIMODEL_NAMESPACES` | empty | comma-separated namespaces to watch; empty watches all |
| `OPTIMODEL_PEERING` | empty: standalone | kopf peering name shared by operator replicas (a ClusterKopfPeering, or a KopfPeering per watched namespace); the operator exits 2 with an ERROR when it does not exist |
| `OPTIMODEL_BUILDER_TOLERATIONS` | `[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]` | JSON list of tolerations for GPU builder and server pods |
| `OPTIMODEL_BUILDER_TOOLCHAIN` | empty: the builder image reference | JSON object of the builder image's versions (`{"onnx": "1.17.0", ...}`); part of every cache key, and the builder refuses a request whose versions are not its own |
| `OPTIMODEL_CPU_CLASS` | `portable` | instruction-set class of CPU engines: `portable` (7-bit INT8 weights, any x86-64 node) or `vnni` (8-bit, builder and server pods only on NFD-labelled VNNI nodes); part of the CPU cache key |
| `OPTIMODEL_BUILDER_DEADLINE_SECONDS` | `7200` | builder Job `activeDeadlineSeconds` |
| `OPTIMODEL_BUILDER_BACKOFF_LIMIT` | `1` | builder Job `backoffLimit` (retries of a failed pod) |
| `OPTIMODEL_BUILDER_TTL_SECONDS` | `86400` | builder Job `ttlSecondsAfterFinished` |
| `OPTIMODEL_BUILD_RETRIES` | `3` | new Jobs for a build that failed for a transient reason (store unreachable, pods evicted); deterministic failures are never retried |
| `OPTIMODEL_BUILD_RETRY_SECONDS` | `30` | backoff before the first such retry, doubling for each next one |
| `OPTIMODEL_BUILDER_RESOURCES` | `{"requests":{"cpu":"2","memory":"8Gi"},"limits":{"cpu":"4","memory":"16Gi"}}` | JSON resources of the builder container (a GPU is added per target; a missing limit is its request) |
| `OPTIMODEL_SERVER_RESOURCES` | `{"requests":{"cpu":"1","memory":"1Gi"},"limits":{"cpu":"2","memory":"2Gi"}}` | JSON resources of server containers when `spec.serving.resources` is unset (a missing limit is its request) |
| `OPTIMODEL_SERVICE_ACCOUNT` | empty | service account of builder and server pods (workload identity for the store) |
| `OPTIMODEL_PVC_ROOT` | `/mnt/pvc` | where pods (and the operator) mount `pvc://<claim>` stores |
| `OPTIMODEL_RESYNC_SECONDS` | `60` | period of the per-model reconcile timer (fleet and child drift) |
| `OPTIMODEL_WORKERS` | `8` | threads running blocking reconciles |
| `OPTIMODEL_LIVENESS` | `http://0.0.0.0:8081/healthz` | kopf liveness endpoint (empty: none); read by `__main__` |
| `OPTIMODEL_LOG_LEVEL` | `INFO` | log level; read by `__main__` |
| `OPTIMODEL_PEERING_PRIORITY` | random per process | kopf peering priority; the highest acts, ties pause all; read by `__main__` |
| `OPTIMODEL_ALLOW_FILE_URIS` | `false` | accept `file://` URIs (store and spec); see below |
| `KUBECONFIG` | `~/.kube/config` | used when not in a cluster (in-cluster config otherwise) |

A `pvc://` store must also be mounted into the operator pod at `$OPTIMODEL_PVC_ROOT/<claim>`
because the operator checks for published manifests (cache hits) itself.

`file://` URIs are refused in a cluster: nothing mounts such a path into the builder
or server pods, so it works only where the operator, every builder and every server
happen to see one filesystem at the same path. `OPTIMODEL_ALLOW_FILE_URIS=true` says
that this holds (the operator tests, which play kubelet on the operator's machine);
anything else should use `pvc://`, `s3://`, `gs://` or `http(s)://`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from optimodel.cache_key import builder_toolchain
from optimodel.storage import check_uri
from optimodel.target import CPU_CLASS_NODE_LABELS, Target

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    store_uri: str = "pvc://optimodel-store/artifacts"
    builder_image: str = "ghcr.io/optimodel/builder:0.1.0"
    serving_image: str = "ghcr.io/optimodel/serving:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    prometheus_url: str = ""
    namespaces: tuple[str, ...] = ()
    peering: str = ""
    tolerations: tuple[dict, ...] = (GPU_TOLERATION,)
    # None: the builder image reference stands for its toolchain (never the operator's own environment)
    toolchain: Mapping[str, str] | None = None
    cpu_class: str = "portable"
    builder_deadline_seconds: int = 7200
    builder_backoff_limit: int = 1
    builder_ttl_seconds: int = 86400
    build_retries: int = 3
    build_retry_seconds: float = 30.0
    builder_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}})
    server_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}})
    service_account: str = ""
    pvc_root: str = "/mnt/pvc"
    resync_seconds: float = 60.0
    workers: int = 8
    allow_file_uris: bool = False

    def toolchain_for(self, target: Target) -> dict[str, str]:
        """The builder's toolchain as the cache key names it (the same for every target: one image)."""
        return builder_toolchain(self.builder_image, dict(self.toolchain) if self.toolchain else None)

    def tensorrt_version(self) -> str:
        """TensorRT of the builder image: declared in the toolchain, else named by the image reference."""
        declared = (self.toolchain or {}).get("tensorrt")
        if declared:
            return str(declared)
        return "image-" + hashlib.sha256(self.builder_image.encode()).hexdigest()[:12]

    @property
    def cpu_target(self) -> Target:
        return Target(arch="cpu", cpu_class=self.cpu_class)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def number(name: str, default, kind=int):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a number") from None
            if value < 0:
                raise SettingsError(f"{name}={raw!r} must not be negative")
            return value

        def blob(name: str, default, kind: type):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise SettingsError(f"{name} is not valid JSON: {exc}") from None
            if not isinstance(value, kind):
                raise SettingsError(f"{name} must be a JSON {kind.__name__}")
            return value

        store = text("OPTIMODEL_STORE_URI", d.store_uri)
        try:
            check_uri(store)
        except ValueError as exc:
            raise SettingsError(f"OPTIMODEL_STORE_URI: {exc}") from None
        flag = env.get("OPTIMODEL_ALLOW_FILE_URIS", "").strip().lower()
        if flag not in ("", "true", "false"):
            raise SettingsError(f"OPTIMODEL_ALLOW_FILE_URIS={flag!r} must be true or false")
        allow_file = flag == "true"
        if store.startswith("file:") and not allow_file:
            raise SettingsError(f"OPTIMODEL_STORE_URI={store}: a file:// store is not mounted into builder or "
                                "server pods; use pvc://<claim>/<path>, s3:// or gs:// (or set "
                                "OPTIMODEL_ALLOW_FILE_URIS=true where every pod sees the same filesystem)")
        cpu_class = text("OPTIMODEL_CPU_CLASS", d.cpu_class)
        if cpu_class not in CPU_CLASS_NODE_LABELS:
            raise SettingsError(f"OPTIMODEL_CPU_CLASS={cpu_class!r} must be one of {', '.join(CPU_CLASS_NODE_LABELS)}")
        toolchain = blob("OPTIMODEL_BUILDER_TOOLCHAIN", None, dict)
        if toolchain is not None:
            toolchain = {str(k): str(v) for k, v in toolchain.items()}
        return cls(
            store_uri=store,
            builder_image=text("OPTIMODEL_BUILDER_IMAGE", d.builder_image),
            serving_image=text("OPTIMODEL_SERVING_IMAGE", d.serving_image),
            image_pull_policy=text("OPTIMODEL_IMAGE_PULL_POLICY", d.image_pull_policy),
            prometheus_url=text("OPTIMODEL_PROMETHEUS_URL", ""),
            namespaces=tuple(n.strip() for n in env.get("OPTIMODEL_NAMESPACES", "").split(",") if n.strip()),
            peering=env.get("OPTIMODEL_PEERING", d.peering).strip(),
            tolerations=tuple(blob("OPTIMODEL_BUILDER_TOLERATIONS", list(d.tolerations), list)),
            toolchain=toolchain,
            cpu_class=cpu_class,
            builder_deadline_seconds=number("OPTIMODEL_BUILDER_DEADLINE_SECONDS", d.builder_deadline_seconds),
            builder_backoff_limit=number("OPTIMODEL_BUILDER_BACKOFF_LIMIT", d.builder_backoff_limit),
            builder_ttl_seconds=number("OPTIMODEL_BUILDER_TTL_SECONDS", d.builder_ttl_seconds),
            build_retries=number("OPTIMODEL_BUILD_RETRIES", d.build_retries),
            build_retry_seconds=number("OPTIMODEL_BUILD_RETRY_SECONDS", d.build_retry_seconds, float),
            builder_resources=blob("OPTIMODEL_BUILDER_RESOURCES", d.builder_resources, dict),
            server_resources=blob("OPTIMODEL_SERVER_RESOURCES", d.server_resources, dict),
            service_account=text("OPTIMODEL_SERVICE_ACCOUNT", ""),
            pvc_root=text("OPTIMODEL_PVC_ROOT", d.pvc_root),
            resync_seconds=number("OPTIMODEL_RESYNC_SECONDS", d.resync_seconds, float),
            workers=max(1, number("OPTIMODEL_WORKERS", d.workers)),
            allow_file_uris=allow_file,
        )
