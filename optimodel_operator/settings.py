"""Operator settings, read once from environment variables at startup.

One source: each field's description, environment variable and shown default below.
The README's table is generated from it (`python -m optimodel_operator.settings`),
and tests/operator/test_settings_table.py fails when the README or the chart drift
from it. Values are validated by pydantic; a bad one is a SettingsError naming the
variable (exit 2).

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
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimodel.cache_key import builder_toolchain
from optimodel.storage import check_uri
from optimodel.target import Target

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PREFIX = "OPTIMODEL_"
TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
# read by kubernetes' own client, not by these settings; listed in the table all the same
EXTRA_ROWS = [("KUBECONFIG", "`~/.kube/config`", "used when not in a cluster (in-cluster config otherwise)")]


class SettingsError(ValueError):
    pass


def _f(default: Any = None, description: str = "", shown: str | None = None, **kw) -> Any:
    """A field with its table row: description and, when the value alone says too little, the shown default."""
    extra = {"shown": shown} if shown is not None else None
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra=extra, **kw)
    return Field(default=default, description=description, json_schema_extra=extra, **kw)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    store_uri: str = _f("pvc://optimodel-store/artifacts",
                        "where engines are published: `<store>/<namespace>/<name>/<cacheKey>/`")
    builder_image: str = _f("ghcr.io/optimodel/builder:0.1.0", "image of the builder Job (`python -m builder_job`)")
    serving_image: str = _f("ghcr.io/optimodel/serving:0.1.0",
                            "image of the serving Deployments (`python -m serving_image`)")
    image_pull_policy: str = _f("IfNotPresent", "pull policy of both images")
    prometheus_url: str = _f("", "Prometheus base URL for the tuner (empty: models with autotune get `Tuned=False, PrometheusNotConfigured`)")
    namespaces: tuple[str, ...] = _f((), "comma-separated namespaces to watch; empty watches all")
    peering: str = _f("", "kopf peering name shared by operator replicas (a ClusterKopfPeering, or a KopfPeering "
                          "per watched namespace); the operator exits 2 with an ERROR when it does not exist",
                      shown="empty: standalone")
    tolerations: tuple[dict, ...] = _f((GPU_TOLERATION,), "JSON list of tolerations for GPU builder and server pods",
                                       alias="builder_tolerations")
    toolchain: Mapping[str, str] | None = _f(
        None, "JSON object of the builder image's versions (`{\"onnx\": \"1.17.0\", ...}`); part of every cache "
              "key, and the builder refuses a request whose versions are not its own",
        shown="empty: the builder image reference", alias="builder_toolchain")
    cpu_class: Literal["portable", "vnni"] = _f(
        "portable", "instruction-set class of CPU engines: `portable` (7-bit INT8 weights, any x86-64 node) or "
                    "`vnni` (8-bit, builder and server pods only on NFD-labelled VNNI nodes); part of the CPU cache key")
    builder_deadline_seconds: int = _f(7200, "builder Job `activeDeadlineSeconds`", ge=0)
    builder_backoff_limit: int = _f(1, "builder Job `backoffLimit` (retries of a failed pod)", ge=0)
    builder_ttl_seconds: int = _f(86400, "builder Job `ttlSecondsAfterFinished`", ge=0)
    build_retries: int = _f(3, "new Jobs for a build that failed for a transient reason (store unreachable, pods "
                               "evicted); deterministic failures are never retried", ge=0)
    build_retry_seconds: float = _f(30.0, "backoff before the first such retry, doubling for each next one", ge=0)
    builder_resources: Mapping[str, Any] = _f(
        lambda: {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        "JSON resources of the builder container (a GPU is added per target; a missing limit is its request)")
    server_resources: Mapping[str, Any] = _f(
        lambda: {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "JSON resources of server containers when `spec.serving.resources` is unset (a missing limit is its request)")
    service_account: str = _f("", "service account of builder and server pods (workload identity for the store)")
    pvc_root: str = _f("/mnt/pvc", "where pods (and the operator) mount `pvc://<claim>` stores")
    resync_seconds: float = _f(60.0, "period of the resync that looks at every model again (fleet and child drift)",
                               ge=0)
    workers: int = _f(8, "threads running blocking reconciles", ge=1)
    liveness: str = _f("http://0.0.0.0:8081/healthz", "kopf liveness endpoint (empty: none)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f("INFO", "log level")
    peering_priority: int | None = _f(None, "kopf peering priority; the highest acts, ties pause all",
                                      shown="random per process")
    allow_file_uris: bool = _f(False, "accept `file://` URIs in the store and in specs; only where the operator "
                                      "and every pod see one filesystem at the same path")

    @field_validator("store_uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        check_uri(uri)
        return uri

    @model_validator(mode="after")
    def _file_store_needs_consent(self) -> "Settings":
        if self.store_uri.startswith("file:") and not self.allow_file_uris:
            raise ValueError(f"{env_name('store_uri')}={self.store_uri}: a file:// store is not mounted into builder or server pods; use "
                             "pvc://<claim>/<path>, s3:// or gs:// (or set OPTIMODEL_ALLOW_FILE_URIS=true where "
                             "every pod sees the same filesystem)")
        return self

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
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            var = env_name(name)
            raw = env.get(var, "").strip()
            if not raw and not (name == "liveness" and var in env):  # set but empty: no liveness endpoint
                continue
            if name == "namespaces":
                values[name] = tuple(n.strip() for n in raw.split(",") if n.strip())
            elif _is_json(name):
                try:
                    values[name] = json.loads(raw)
                except ValueError as exc:
                    raise SettingsError(f"{var} is not valid JSON: {exc}") from None
            elif name == "log_level":
                values[name] = raw.upper()
            elif name == "allow_file_uris":
                if raw.lower() not in ("true", "false"):
                    raise SettingsError(f"{var}={raw!r} must be true or false")
                values[name] = raw.lower() == "true"
            else:
                values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across fields: its message names the variables
                raise SettingsError(message) from None
            where = env_name(str(err["loc"][0]))
            raise SettingsError(f"{where}={env.get(where, '')!r}: {message}") from None


def env_name(field: str) -> str:
    info = Settings.model_fields[field]
    return PREFIX + (info.alias or field).upper()


def _is_json(field: str) -> bool:
    return field in ("tolerations", "toolchain", "builder_resources", "server_resources")


def _shown(field: str) -> str:
    info = Settings.model_fields[field]
    extra = info.json_schema_extra or {}
    if "shown" in extra:
        return str(extra["shown"])
    value = info.get_default(call_default_factory=True)
    if value in ("", (), None):
        return "empty"
    if _is_json(field):
        value = json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))
    elif isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_table() -> str:
    """The README's table of environment variables, from the fields."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        rows.append(f"| `{env_name(name)}` | {_shown(name)} | {info.description} |")
    rows += [f"| `{var}` | {default} | {meaning} |" for var, default, meaning in EXTRA_ROWS]
    return "\n".join(rows)


def env_names() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}


if __name__ == "__main__":
    print(settings_table())
