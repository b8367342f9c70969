"""What the operator (or `optimodel run`) hands a builder, and what the builder answers.

The request is a JSON file (a ConfigMap mount in a cluster). The result is one line
of JSON: printed to stdout, written to /dev/termination-log when it exists (the
operator reads it from the Job's pod status), and to --result when given.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from optimodel.spec import Accuracy, ApiModel, ModelSource, Optimization
from optimodel.target import Target

BUILD_REQUEST_VERSION = "optimodel.io/build/v1"
TERMINATION_LOG = "/dev/termination-log"


class BuildReason(StrEnum):
    """Why a build ended; each failure has its own code so status can say exactly why."""

    SUCCEEDED = "Succeeded"
    CACHE_HIT = "CacheHit"
    FETCH_FAILED = "FetchFailed"  # unreachable URI or missing object
    UNAUTHORIZED = "Unauthorized"  # the store refused the credentials
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    INVALID_MODEL = "InvalidModel"  # corrupt or unparsable model file
    INVALID_REQUEST = "InvalidRequest"  # the build request file is unreadable or invalid
    INPUT_MISMATCH = "InputMismatch"  # declared inputs do not match the model
    OUTPUT_MISMATCH = "OutputMismatch"  # declared outputs do not match the model
    INVALID_DATASET = "InvalidDataset"  # calibration / gate / distillation data of wrong shape or dtype
    PRUNING_UNSUPPORTED = "PruningUnsupported"  # pruning asked for a non-PyTorch source
    EXPORT_FAILED = "ExportFailed"  # ONNX export or its check against the source failed
    QUANTIZATION_FAILED = "QuantizationFailed"
    ACCURACY_GATE_FAILED = "AccuracyGateFailed"
    TENSORRT_BUILD_FAILED = "TensorRTBuildFailed"
    NO_GPU = "NoGPU"  # a GPU target on a machine without one
    NOT_IMPLEMENTED = "NotImplemented"
    PUBLISH_FAILED = "PublishFailed"
    TOOLCHAIN_MISMATCH = "ToolchainMismatch"  # the request's toolchain (part of its key) is not this image's
    CPU_CLASS_MISMATCH = "CPUClassMismatch"  # a vnni-class build on a host without VNNI (another node may fit)
    BUILD_FAILED = "BuildFailed"  # anything else, with the message


# The builder's exit codes. A failure that fails the same way on every retry exits
# EXIT_WILL_FAIL_AGAIN (or EXIT_BAD_REQUEST), and the builder Job's podFailurePolicy
# fails the Job on these at once instead of spending its backoffLimit on them.
EXIT_OK, EXIT_FAILED, EXIT_BAD_REQUEST, EXIT_WILL_FAIL_AGAIN = 0, 1, 2, 3
DETERMINISTIC_EXIT_CODES = (EXIT_BAD_REQUEST, EXIT_WILL_FAIL_AGAIN)
DETERMINISTIC_REASONS = frozenset({
    BuildReason.CHECKSUM_MISMATCH, BuildReason.INVALID_MODEL, BuildReason.INVALID_REQUEST,
    BuildReason.INPUT_MISMATCH, BuildReason.OUTPUT_MISMATCH, BuildReason.INVALID_DATASET,
    BuildReason.PRUNING_UNSUPPORTED, BuildReason.EXPORT_FAILED, BuildReason.QUANTIZATION_FAILED,
    BuildReason.ACCURACY_GATE_FAILED, BuildReason.NOT_IMPLEMENTED, BuildReason.TOOLCHAIN_MISMATCH,
})
# Failures another attempt may not repeat: the operator retries these with backoff (a new Job).
# BUILD_FAILED (anything else) is not here: an unknown failure is retried by the Job's own
# backoffLimit, not by new Jobs.
TRANSIENT_REASONS = frozenset({
    BuildReason.FETCH_FAILED, BuildReason.PUBLISH_FAILED, BuildReason.CPU_CLASS_MISMATCH, BuildReason.NO_GPU,
})


def exit_code_for(reason: BuildReason) -> int:
    """The builder's exit code for a result: transient failures (a store, a node, a bug) may pass on a retry."""
    if reason in (BuildReason.SUCCEEDED, BuildReason.CACHE_HIT):
        return EXIT_OK
    if reason == BuildReason.INVALID_REQUEST:
        return EXIT_BAD_REQUEST
    return EXIT_WILL_FAIL_AGAIN if reason in DETERMINISTIC_REASONS else EXIT_FAILED


class BuildRequest(ApiModel):
    api_version: Literal["optimodel.io/build/v1"] = BUILD_REQUEST_VERSION
    namespace: str = "default"
    model_name: str
    source: ModelSource
    optimization: Optimization = Field(default_factory=Optimization)
    target: Target
    max_batch_size: int = Field(ge=1)
    cache_key: str
    artifact_uri: str = Field(description="Where to publish: <store>/<namespace>/<name>/<cacheKey>")
    toolchain: dict[str, str] = Field(
        default_factory=dict,
        description="The toolchain part of cache_key; the builder refuses (ToolchainMismatch) declared package "
                    "versions it does not have")
    timing_cache_uri: str | None = Field(default=None, description="TensorRT timing cache kept per arch in the store")
    base_dir: str | None = Field(default=None, description="Directory that relative file:// URIs resolve against (local runs)")


class BuildResult(ApiModel):
    state: Literal["Succeeded", "Failed"]
    reason: BuildReason
    cache_key: str
    message: str = ""
    artifact_uri: str | None = None
    accuracy: Accuracy | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage")

    def line(self) -> str:
        """One line of JSON, short enough for the 4096-byte termination message."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        if len(text) > 4000:
            text = self.model_copy(update={"message": self.message[:1000] + " …"}).model_dump_json(
                by_alias=True, exclude_none=True)
        return text
