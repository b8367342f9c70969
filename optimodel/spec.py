"""The OptimizedModel API: spec and status, the single source of truth for the CRD.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in
Python. Every model forbids unknown fields so a typo is an error naming the field,
not a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from optimodel.storage import SUPPORTED_SCHEMES, check_uri

API_GROUP = "optimodel.io"
API_VERSION = "v1alpha1"
KIND = "OptimizedModel"
PLURAL = "optimizedmodels"
SINGULAR = "optimizedmodel"
SHORT_NAMES = ["om", "omodel"]

# "string": UTF-8 text, the v2 protocol's BYTES (ONNX tensor(string)); served, not compressed by the builder
DType = Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool", "string"]
Precision = Literal["fp32", "fp16", "int8"]
ModelFormat = Literal["onnx", "torchscript", "torch-export", "pytorch"]
GateMetric = Literal["top1", "top1-agreement", "cosine"]
ARCH_PATTERN = r"^sm[0-9]{2,3}$"


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as it is stored in the Kubernetes API."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _uri(value: str) -> str:
    check_uri(value)
    return value


StoreUri = Annotated[
    str,
    AfterValidator(_uri),
    Field(
        min_length=1,
        description="Store URI; schemes: " + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES),
    ),
]


class TensorSpec(ApiModel):
    name: str = Field(min_length=1, description="Tensor name as in the model graph.")
    dtype: DType
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        min_length=1, description="Dimensions; -1 marks a dynamic axis (axis 0 is the batch axis)."
    )

    @field_validator("shape")
    @classmethod
    def _no_zero_dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 for d in shape):
            raise ValueError("dimensions must be positive or -1 (dynamic)")
        return shape


CODE_SUFFIXES = (".py", ".zip", ".tar", ".tar.gz", ".tgz")


class ModelCode(ApiModel):
    uri: StoreUri = Field(description="A .py module or a .zip / .tar / .tar.gz / .tgz of modules and packages.")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("uri")
    @classmethod
    def _code_suffix(cls, uri: str) -> str:
        if not uri.lower().endswith(CODE_SUFFIXES):
            raise ValueError(f"code uri must end with one of {', '.join(CODE_SUFFIXES)}, got '{uri}'")
        return uri


class ModelSource(ApiModel):
    uri: StoreUri
    format: ModelFormat = "onnx"
    entrypoint: str | None = Field(
        default=None,
        description="For format pytorch: 'module:callable' returning the nn.Module; the uri holds its state_dict.",
    )
    code: ModelCode | None = Field(
        default=None,
        description="For format pytorch: the code the entrypoint imports, fetched and checksummed like the "
                    "model and put on the import path of the builder only (servers run the ONNX). "
                    "Required in a cluster.",
    )
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    credentials_secret: str | None = Field(
        default=None, description="Secret in the model's namespace with the store credentials."
    )
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] | None = None


    @model_validator(mode="after")
    def _entrypoint_for_pytorch(self) -> "ModelSource":
        if self.format == "pytorch":
            if not self.entrypoint or not re.match(r"^[\w.]+:[\w.]+$", self.entrypoint):
                raise ValueError("format 'pytorch' needs entrypoint 'module:callable'")
        elif self.entrypoint is not None:
            raise ValueError(f"entrypoint is only allowed with format 'pytorch', not '{self.format}'")
        elif self.code is not None:
            raise ValueError(f"code is only allowed with format 'pytorch', not '{self.format}'")
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        return self


class Distillation(ApiModel):
    dataset_uri: StoreUri
    epochs: int = Field(default=3, ge=1, le=1000)
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1, description="Weight of the soft-target loss.")



class Pruning(ApiModel):
    ratio: float = Field(gt=0, lt=1, description="Fraction of channels to remove.")
    method: Literal["l1", "l2", "taylor"] = "l2"
    distillation: Distillation | None = None


class Calibration(ApiModel):
    dataset_uri: StoreUri
    samples: int = Field(default=256, ge=1)



class AccuracyGate(ApiModel):
    dataset_uri: StoreUri
    metric: GateMetric = "top1-agreement"
    max_drop: float = Field(default=0.005, ge=0, le=1)



class Optimization(ApiModel):
    precision: Precision = "fp32"
    pruning: Pruning | None = None
    calibration: Calibration | None = None
    accuracy_gate: AccuracyGate | None = None


class Targets(ApiModel):
    gpu_architectures: Union[Literal["auto"], list[Annotated[str, Field(pattern=ARCH_PATTERN)]]] = Field(
        default="auto",
        description="'auto' (every GPU architecture in the cluster) or a list like [sm80, sm90].",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    cpu: bool = Field(default=False, description="Also build and serve a CPU (ONNX Runtime) engine.")


class Autotune(ApiModel):
    enabled: bool = False
    p99_latency_ms: float | None = Field(default=None, gt=0)
    min_wait_ms: float = Field(default=0, ge=0)
    max_wait_ms: float = Field(default=50, ge=0)
    interval_seconds: int = Field(default=30, ge=5)

    @model_validator(mode="after")
    def _bounds(self) -> "Autotune":
        if self.min_wait_ms > self.max_wait_ms:
            raise ValueError(f"minWaitMs ({self.min_wait_ms}) must not exceed maxWaitMs ({self.max_wait_ms})")
        if self.enabled and self.p99_latency_ms is None:
            raise ValueError("p99LatencyMs is required when autotune is enabled")
        return self


class Batching(ApiModel):
    max_wait_ms: float = Field(default=2.0, ge=0, description="0 sends every request at once.")
    autotune: Autotune = Field(default_factory=Autotune)


Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")]


class Resources(ApiModel):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class Serving(ApiModel):
    replicas: int = Field(default=1, ge=0)
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_queue: int = Field(default=1024, ge=1)
    batching: Batching = Field(default_factory=Batching)
    resources: Resources | None = None


class OptimizedModelSpec(ApiModel):
    model: ModelSource
    optimization: Optimization = Field(default_factory=Optimization)
    targets: Targets = Field(default_factory=Targets)
    serving: Serving = Field(default_factory=Serving)

    @model_validator(mode="after")
    def _cross_field(self) -> "OptimizedModelSpec":
        opt = self.optimization
        if opt.pruning is not None and self.model.format == "onnx":
            raise ValueError("optimization.pruning needs a PyTorch source (torchscript, torch-export or pytorch), not onnx")
        return self


# ---- status -----------------------------------------------------------------

ConditionType = Literal["Ready", "Built", "AccuracyGatePassed", "Serving", "Tuned"]
EngineState = Literal["Pending", "Building", "Ready", "Failed", "Removed"]


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Accuracy(ApiModel):
    metric: GateMetric
    original: float
    optimized: float
    drop: float


class EngineStatus(ApiModel):
    arch: str
    product: str | None = None
    state: EngineState
    cache_key: str | None = None
    artifact_uri: str | None = None
    precision: Precision | None = None
    accuracy: Accuracy | None = None
    reason: str | None = None
    message: str | None = None
    job_name: str | None = None
    serving_cache_key: str | None = Field(
        default=None,
        description="Engine the pods of this architecture serve now; differs from cacheKey while a rebuild runs or after it failed.",
    )


class ServingStatus(ApiModel):
    endpoint: str | None = None
    max_wait_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None
    last_tuned_time: str | None = None


class OptimizedModelStatus(ApiModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    engines: list[EngineStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["arch"]},
    )
    serving: ServingStatus | None = None


class ObjectMeta(BaseModel):
    """The part of metadata a manifest must carry; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None


class OptimizedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["optimodel.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["OptimizedModel"]
    metadata: ObjectMeta
    spec: OptimizedModelSpec
    status: OptimizedModelStatus | None = None
