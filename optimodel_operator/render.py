"""Manifests of the children of an OptimizedModel (pure: dicts in, dicts out).

Every child carries an ownerReference to its model (deleting the model
garbage-collects them) and the labels the operator finds them by again after a
restart: app.kubernetes.io/*, optimodel.io/model, optimodel.io/arch and, on
builder Jobs, optimodel.io/cache-key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from urllib.parse import urlparse

from optimodel.batching import BATCHING_FILE, BatchingConfig, dump_batching_config
from optimodel.build import DETERMINISTIC_EXIT_CODES, BuildRequest
from optimodel.spec import API_GROUP, API_VERSION, KIND, OptimizedModelSpec
from optimodel.target import CPU_CLASS_NODE_LABELS, Target

from optimodel_operator.discovery import GPU_RESOURCE, LABEL_MAJOR, LABEL_MINOR
from optimodel_operator.settings import Settings

MANAGED_BY = "optimodel-operator"
L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_COMPONENT = "app.kubernetes.io/component"
L_MANAGED_BY = "app.kubernetes.io/managed-by"
L_PART_OF = "app.kubernetes.io/part-of"
L_MODEL = "optimodel.io/model"
L_ARCH = "optimodel.io/arch"
L_KEY = "optimodel.io/cache-key"
A_ARTIFACT = "optimodel.io/artifact-uri"
A_KEY = "optimodel.io/cache-key"
A_HASH = "optimodel.io/config-hash"
A_GENERATION = "optimodel.io/generation"
A_REBUILD = "optimodel.io/rebuild"  # on the OptimizedModel: a new value retries its failed builds once

BUILDER, SERVER, BATCHING, REQUEST, SERVICE = "builder", "server", "batching", "build-request", "service"
PORT = 8080
GRPC_PORT = 8081  # the Open Inference Protocol over gRPC, same batcher as PORT
REQUEST_DIR = "/etc/optimodel/request"
BATCHING_DIR = "/etc/optimodel/batching"
SELECTOR = f"{L_MANAGED_BY}={MANAGED_BY}"

RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}


@dataclass(frozen=True)
class ModelRef:
    namespace: str
    name: str
    uid: str

    @classmethod
    def from_body(cls, body) -> "ModelRef":
        meta = body["metadata"]
        return cls(namespace=meta.get("namespace") or "default", name=meta["name"], uid=meta.get("uid", ""))

    def owner_reference(self) -> dict:
        return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


def child_name(*parts: str, limit: int = 63) -> str:
    """A DNS label from parts; when too long, cut and suffixed with a hash so names stay unique."""
    full = "-".join(p for p in parts if p).lower()
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[:limit - 9].rstrip('-')}-{digest}"


def job_name(model: str, target: Target, key: str, attempt: int = 0) -> str:
    # the key in the name makes a second Job for the same key an AlreadyExists, never a duplicate;
    # a retry (rebuild annotation, transient failure) is a new attempt with its own name
    return child_name(model, "build", target.arch, key[:10], f"r{attempt}" if attempt else "")


def deployment_name(model: str, arch: str) -> str:
    return child_name(model, arch)


def service_name(model: str) -> str:
    return child_name(model)


def batching_name(model: str) -> str:
    return child_name(model, "batching")


def labels(model: ModelRef, component: str, arch: str | None = None, **extra: str) -> dict:
    out = {L_NAME: "optimodel", L_INSTANCE: model.name, L_COMPONENT: component,
           L_MANAGED_BY: MANAGED_BY, L_PART_OF: "optimodel", L_MODEL: model.name}
    if arch:
        out[L_ARCH] = arch
    out.update(extra)
    return out


def metadata(model: ModelRef, name: str, component: str, arch: str | None = None,
             annotations: dict | None = None, **extra: str) -> dict:
    meta = {"name": name, "namespace": model.namespace, "labels": labels(model, component, arch, **extra),
            "ownerReferences": [model.owner_reference()]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def node_selector(target: Target) -> dict:
    cc = target.compute_capability
    if cc is None:
        return {}
    return {LABEL_MAJOR: str(cc[0]), LABEL_MINOR: str(cc[1])}


def pvc_claims(spec: OptimizedModelSpec, store_uri: str) -> list[str]:
    uris = [store_uri, spec.model.uri]
    if spec.model.code:
        uris.append(spec.model.code.uri)
    opt = spec.optimization
    if opt.calibration:
        uris.append(opt.calibration.dataset_uri)
    if opt.accuracy_gate:
        uris.append(opt.accuracy_gate.dataset_uri)
    if opt.pruning and opt.pruning.distillation:
        uris.append(opt.pruning.distillation.dataset_uri)
    claims = []
    for uri in uris:
        parsed = urlparse(uri)
        if parsed.scheme == "pvc" and parsed.netloc not in claims:
            claims.append(parsed.netloc)
    return claims


def _storage_mounts(claims: list[str], settings: Settings, read_only: bool) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    for i, claim in enumerate(claims):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{settings.pvc_root}/{claim}", "readOnly": read_only})
    return volumes, mounts


def cpu_class_affinity(target: Target) -> dict | None:
    """Nodes of the target's CPU class (Node Feature Discovery labels; the terms are ORed)."""
    node_labels = CPU_CLASS_NODE_LABELS.get(target.cpu_class or "portable", ())
    if target.kind != "cpu" or not node_labels:
        return None
    terms = [{"matchExpressions": [{"key": label, "operator": "In", "values": ["true"]}]} for label in node_labels]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def with_limits(resources) -> dict:
    """Requests and limits for cpu and memory, so a namespace's ResourceQuota (which refuses pods
    without them when it caps limits) and LimitRange apply: a missing limit is its request, a
    missing request its limit (what the API server defaults it to anyway)."""
    out = json.loads(json.dumps(dict(resources or {})))
    requests, limits = out.setdefault("requests", {}), out.setdefault("limits", {})
    for name in ("cpu", "memory"):
        if name in requests and name not in limits:
            limits[name] = requests[name]
        elif name in limits and name not in requests:
            requests[name] = limits[name]
    return out


def _pod_common(settings: Settings, target: Target) -> dict:
    pod: dict = {"securityContext": dict(RESTRICTED_POD)}
    selector = node_selector(target)
    if selector:
        pod["nodeSelector"] = selector
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    affinity = cpu_class_affinity(target)
    if affinity:
        pod["affinity"] = affinity
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    return pod


def _env(spec: OptimizedModelSpec, settings: Settings) -> tuple[list[dict], list[dict]]:
    env = [{"name": "OPTIMODEL_PVC_ROOT", "value": settings.pvc_root},
           {"name": "HOME", "value": "/tmp"}]
    env_from = []
    if spec.model.credentials_secret:
        # optional: false makes a missing Secret a CreateContainerConfigError the operator reports
        env_from.append({"secretRef": {"name": spec.model.credentials_secret, "optional": False}})
    return env, env_from


def build_request(model: ModelRef, spec: OptimizedModelSpec, target: Target, key: str, artifact: str,
                  toolchain: dict[str, str] | None = None, timing_cache: str | None = None) -> BuildRequest:
    return BuildRequest(namespace=model.namespace, model_name=model.name, source=spec.model,
                        optimization=spec.optimization, target=target, toolchain=toolchain or {},
                        timing_cache_uri=timing_cache,
                        max_batch_size=spec.serving.max_batch_size, cache_key=key, artifact_uri=artifact)


def request_configmap(model: ModelRef, name: str, request: BuildRequest, target: Target) -> dict:
    """The build request; owned by its Job once that exists (owned_by_job), so it goes with the Job."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(model, name, REQUEST, target.arch, **{L_KEY: request.cache_key}),
            "data": {"request.json": json.dumps(request.wire(), sort_keys=True)}}


def owned_by_job(configmap: dict, job: dict) -> dict:
    """The request ConfigMap owned by its Job: the Job's TTL or deletion removes it, not the model's."""
    meta = job["metadata"]
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}
    return {**configmap, "metadata": {**configmap["metadata"], "ownerReferences": [owner]}}


def pod_failure_policy() -> dict:
    """Fail the Job at once on the builder's exit codes for failures every retry repeats
    (Kubernetes >= 1.31); evictions and preemptions do not count against backoffLimit."""
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": BUILDER, "operator": "In", "values": list(DETERMINISTIC_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def builder_job(model: ModelRef, spec: OptimizedModelSpec, target: Target, key: str, name: str,
                settings: Settings, generation: int | None = None) -> dict:
    env, env_from = _env(spec, settings)
    volumes, mounts = _storage_mounts(pvc_claims(spec, settings.store_uri), settings, read_only=False)
    volumes.append({"name": "request", "configMap": {"name": name}})
    mounts.append({"name": "request", "mountPath": REQUEST_DIR, "readOnly": True})
    resources = with_limits(settings.builder_resources)
    if target.kind == "gpu":
        resources.setdefault("limits", {})[GPU_RESOURCE] = 1
    container = {
        "name": BUILDER, "image": settings.builder_image, "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "builder_job", "--request", f"{REQUEST_DIR}/request.json"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env, "resources": resources, "volumeMounts": mounts,
        "securityContext": dict(RESTRICTED_CONTAINER),
    }
    if env_from:
        container["envFrom"] = env_from
    pod = _pod_common(settings, target)
    pod.update({"restartPolicy": "Never", "containers": [container], "volumes": volumes})
    pod_labels = labels(model, BUILDER, target.arch, **{L_KEY: key})
    annotations = {A_KEY: key}
    if generation is not None:
        annotations[A_GENERATION] = str(generation)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(model, name, BUILDER, target.arch, annotations, **{L_KEY: key}),
        "spec": {
            "backoffLimit": settings.builder_backoff_limit,
            "podFailurePolicy": pod_failure_policy(),
            "activeDeadlineSeconds": settings.builder_deadline_seconds,
            "ttlSecondsAfterFinished": settings.builder_ttl_seconds,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def batching_config(spec: OptimizedModelSpec, current_wait_ms: float | None = None,
                    current_by_arch: dict[str, float] | None = None) -> BatchingConfig:
    """The spec's batching; with autotune on, the tuner's current windows (clamped to the bounds) are kept."""
    batching = spec.serving.batching
    auto = batching.autotune
    wait, by_arch = batching.max_wait_ms, {}
    if auto.enabled:
        clamp = lambda w: min(max(w, auto.min_wait_ms), auto.max_wait_ms)
        if current_wait_ms is not None:
            wait = clamp(current_wait_ms)
        by_arch = {arch: clamp(w) for arch, w in (current_by_arch or {}).items()}
    return BatchingConfig(max_wait_ms=wait, max_batch_size=spec.serving.max_batch_size,
                          max_queue=spec.serving.max_queue, max_wait_ms_by_arch=by_arch)


def batching_configmap(model: ModelRef, config: BatchingConfig) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(model, batching_name(model.name), BATCHING),
            "data": {BATCHING_FILE: dump_batching_config(config)}}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _deadline_args(spec: OptimizedModelSpec) -> list[str]:
    """The p99 SLO, when set, is the server's admission deadline: later answers help nobody."""
    slo = spec.serving.batching.autotune.p99_latency_ms
    return ["--deadline-ms", f"{slo:g}"] if slo else []


def deployment(model: ModelRef, spec: OptimizedModelSpec, target: Target, artifact_uri: str, key: str,
               settings: Settings, replicas: int | None = None) -> dict:
    env, env_from = _env(spec, settings)
    volumes, mounts = _storage_mounts(pvc_claims(spec, settings.store_uri), settings, read_only=True)
    volumes.append({"name": "batching", "configMap": {"name": batching_name(model.name)}})
    mounts.append({"name": "batching", "mountPath": BATCHING_DIR, "readOnly": True})
    resources = with_limits(spec.serving.resources.wire() if spec.serving.resources else settings.server_resources)
    if target.kind == "gpu":
        resources.setdefault("limits", {})[GPU_RESOURCE] = 1
    probe = lambda path, delay: {"httpGet": {"path": path, "port": "http"}, "initialDelaySeconds": delay,
                                  "periodSeconds": 5, "failureThreshold": 6}
    container = {
        "name": SERVER, "image": settings.serving_image, "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "serving_image", "--artifact", artifact_uri,
                    "--config", f"{BATCHING_DIR}/{BATCHING_FILE}", "--host", "0.0.0.0",
                    "--port", str(PORT), "--grpc-port", str(GRPC_PORT), "--model-name", model.name,
                    # keep accepting while endpoint removal reaches every kube-proxy, then drain
                    "--drain-seconds", "5", *_deadline_args(spec)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "readinessProbe": probe("/v2/health/ready", 2),
        "livenessProbe": probe("/v2/health/live", 10),
        "env": env, "resources": resources, "volumeMounts": mounts,
        "securityContext": dict(RESTRICTED_CONTAINER),
    }
    if env_from:
        container["envFrom"] = env_from
    pod = _pod_common(settings, target)
    pod.update({"containers": [container], "volumes": volumes})
    select = {L_MODEL: model.name, L_ARCH: target.arch, L_COMPONENT: SERVER}
    template_meta = {"labels": labels(model, SERVER, target.arch),
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                     "prometheus.io/path": "/metrics", A_KEY: key}}
    body_spec = {"replicas": spec.serving.replicas if replicas is None else replicas,
                 "selector": {"matchLabels": select},
                 "template": {"metadata": template_meta, "spec": pod}}
    annotations = {A_ARTIFACT: artifact_uri, A_KEY: key, A_HASH: _hash(body_spec)}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": metadata(model, deployment_name(model.name, target.arch), SERVER, target.arch, annotations),
            "spec": body_spec}


def service(model: ModelRef) -> dict:
    body_spec = {"selector": {L_MODEL: model.name, L_COMPONENT: SERVER},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"},
                           {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "kubernetes.io/h2c"}]}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(model, service_name(model.name), SERVICE, annotations={A_HASH: _hash(body_spec)}),
            "spec": body_spec}


def endpoint(model: ModelRef) -> str:
    return f"http://{service_name(model.name)}.{model.namespace}.svc:{PORT}"
