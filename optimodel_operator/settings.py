"""Operator settings, read once from environment variables at startup (pydantic-settings).

One source: each field's description, environment variable, shown default and the chart
value that sets it, below. The README's table and the chart README's table are generated
from it (`python -m optimodel_operator.settings [--chart]`), and
tests/operator/test_settings_table.py fails when either drifts. Values are validated by
pydantic; a bad one is a SettingsError naming the variable (exit 2).

Hermetic by construction: `Settings(...)` reads only its keyword arguments (tests build
settings in-process without the machine's environment leaking in), and
`Settings.from_env(mapping)` reads exactly the variables of that mapping; only
`__main__` and the kopf startup hand it `os.environ`.

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
import sys
from typing import Annotated, Any, Literal, Mapping

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from optimodel.cache_key import builder_toolchain
from optimodel.storage import check_uri
from optimodel.target import Target

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PREFIX = "OPTIMODEL_"
TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
CHART_TABLE_START, CHART_TABLE_END = "<!-- operator-env-table:start -->", "<!-- operator-env-table:end -->"


class SettingsError(ValueError):
    pass


def _f(default: Any = None, description: str = "", shown: str | None = None, chart: str | None = None,
       env: str | None = None, **kw) -> Any:
    """A field with its table rows: description, the shown default when the value alone says too
    little, the chart value that sets it, and its variable when that is not OPTIMODEL_<FIELD>."""
    extra = {k: v for k, v in (("shown", shown), ("chart", chart)) if v is not None} or None
    if env is not None:
        kw["validation_alias"] = AliasChoices(kw.pop("name"), env)
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra=extra, **kw)
    return Field(default=default, description=description, json_schema_extra=extra, **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="forbid", populate_by_name=True, env_prefix=PREFIX,
                                      case_sensitive=False, env_ignore_empty=True)

    store_uri: str = _f("pvc://optimodel-store/artifacts",
                        "where engines are published: `<store>/<namespace>/<name>/<cacheKey>/`",
                        chart="store.uri (or store.pvc)")
    builder_image: str = _f("ghcr.io/optimodel/builder:0.1.0", "image of the builder Job (`python -m builder_job`)",
                            chart="image.builder")
    serving_image: str = _f("ghcr.io/optimodel/serving:0.1.0",
                            "image of the serving Deployments (`python -m serving_image`)", chart="image.serving")
    image_pull_policy: str = _f("IfNotPresent", "pull policy of both images", chart="image.builder.pullPolicy")
    prometheus_url: str = _f("", "Prometheus base URL for the tuner (empty: models with autotune get "
                                 "`Tuned=False, PrometheusNotConfigured`)", chart="prometheus.url")
    namespaces: Annotated[tuple[str, ...], NoDecode] = _f(
        (), "comma-separated namespaces to watch; empty watches all", chart="watchNamespaces")
    peering: str = _f("", "kopf peering name shared by operator replicas (a ClusterKopfPeering, or a KopfPeering "
                          "per watched namespace); the operator exits 2 with an ERROR when it does not exist",
                      shown="empty: standalone", chart="operator.peering")
    tolerations: tuple[dict, ...] = _f((GPU_TOLERATION,), "JSON list of tolerations for GPU builder and server pods",
                                       chart="builder.tolerations", name="tolerations",
                                       env=PREFIX + "BUILDER_TOLERATIONS")
    toolchain: Mapping[str, str] | None = _f(
        None, "JSON object of the builder image's versions (`{\"onnx\": \"1.17.0\", ...}`); part of every cache "
              "key, and the builder refuses a request whose versions are not its own",
        shown="empty: the builder image reference", chart="builder.toolchain", name="toolchain",
        env=PREFIX + "BUILDER_TOOLCHAIN")
    cpu_class: Literal["portable", "vnni"] = _f(
        "portable", "instruction-set class of CPU engines: `portable` (7-bit INT8 weights, any x86-64 node) or "
                    "`vnni` (8-bit, builder and server pods only on NFD-labelled VNNI nodes); part of the CPU cache key",
        chart="builder.cpuClass")
    builder_deadline_seconds: int = _f(7200, "builder Job `activeDeadlineSeconds`", ge=0,
                                       chart="builder.activeDeadlineSeconds")
    builder_backoff_limit: int = _f(1, "builder Job `backoffLimit` (retries of a failed pod)", ge=0,
                                    chart="builder.backoffLimit")
    builder_ttl_seconds: int = _f(86400, "builder Job `ttlSecondsAfterFinished`", ge=0,
                                  chart="builder.ttlSecondsAfterFinished")
    build_retries: int = _f(3, "new Jobs for a build that failed for a transient reason (store unreachable, pods "
                               "evicted); deterministic failures are never retried", ge=0, chart="builder.retries")
    build_retry_seconds: float = _f(30.0, "backoff before the first such retry, doubling for each next one", ge=0,
                                    chart="builder.retrySeconds")
    builder_resources: Mapping[str, Any] = _f(
        lambda: {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        "JSON resources of the builder container (a GPU is added per target; a missing limit is its request)",
        chart="builder.resources")
    server_resources: Mapping[str, Any] = _f(
        lambda: {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "JSON resources of server containers when `spec.serving.resources` is unset (a missing limit is its request)",
        chart="server.resources")
    service_account: str = _f("", "service account of builder and server pods (workload identity for the store)",
                              chart="workloadServiceAccount")
    pvc_root: str = _f("/mnt/pvc", "where pods (and the operator) mount `pvc://<claim>` stores", chart="store.pvcRoot")
    resync_seconds: float = _f(60.0, "period of the resync that looks at every model again (fleet and child drift)",
                               ge=0, chart="operator.resyncSeconds")
    workers: int = _f(8, "threads running blocking reconciles", ge=1, chart="operator.workers")
    liveness: str = _f("http://0.0.0.0:8081/healthz", "kopf liveness endpoint (empty: none)",
                       chart="operator.health")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f("INFO", "log level", chart="operator.logLevel")
    peering_priority: int | None = _f(None, "kopf peering priority; the highest acts, ties pause all",
                                      shown="random per process")
    allow_file_uris: bool = _f(False, "accept `file://` URIs in the store and in specs; only where the operator "
                                      "and every pod see one filesystem at the same path")
    kubeconfig: str = _f("", "used when not in a cluster (in-cluster config otherwise)", shown="`~/.kube/config`",
                         name="kubeconfig", env="KUBECONFIG")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # keyword arguments only: from_env() turns an explicit mapping into them, so nothing reads
        # the process environment behind a test's back
        return (init_settings,)

    @field_validator("namespaces", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("allow_file_uris", mode="before")
    @classmethod
    def _true_or_false(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() not in ("true", "false"):
            raise ValueError("must be true or false")
        return value

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
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Settings from exactly these variables (pass os.environ explicitly to read the process's).
        Empty values mean the default, except OPTIMODEL_LIVENESS, where empty means no endpoint."""
        mine = {var: env[var] for var in env_names() if var in env}
        try:
            values = _MappingSource(cls, mine)()
        except SourceError as exc:  # a JSON value that does not parse
            field = str(exc).split('"')[1] if '"' in str(exc) else ""
            var = env_name(field) if field in cls.model_fields else "a setting"
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            raise SettingsError(f"{var}={mine.get(var, '')!r} is not valid JSON{cause}") from None
        if mine.get(env_name("liveness"), None) == "":
            values["liveness"] = ""
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across fields: its message names the variables
                raise SettingsError(message) from None
            loc = str(err["loc"][0])
            where = env_name(loc) if loc in cls.model_fields else loc.upper()
            raise SettingsError(f"{where}={mine.get(where, '')!r}: {message}") from None


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source (names, prefixes, JSON of complex fields) over a
    given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._mapping = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._mapping.items() if not (self.env_ignore_empty and v == "")}


def env_name(field: str) -> str:
    info = Settings.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[-1])
    return PREFIX + field.upper()


def _extra(field: str) -> dict:
    return dict(Settings.model_fields[field].json_schema_extra or {})


def _is_json(field: str) -> bool:
    return field in ("tolerations", "toolchain", "builder_resources", "server_resources")


def _shown(field: str) -> str:
    info = Settings.model_fields[field]
    if "shown" in _extra(field):
        return str(_extra(field)["shown"])
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
    return "\n".join(rows)


def chart_table() -> str:
    """The chart README's table: which value sets each variable of the operator."""
    rows = ["| variable | set from value | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        chart = _extra(name).get("chart")
        rows.append(f"| `{env_name(name)}` | {f'`{chart}`' if chart else 'not set by the chart'} | {info.description} |")
    return "\n".join(rows)


def chart_values() -> dict[str, str]:
    """variable -> the chart value that sets it (first word: a path under .Values)."""
    return {env_name(n): _extra(n)["chart"].split()[0] for n in Settings.model_fields if "chart" in _extra(n)}


def env_names() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}


if __name__ == "__main__":
    print(chart_table() if "--chart" in sys.argv[1:] else settings_table())
