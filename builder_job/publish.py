"""Publish stage: report.json, the manifest, and the atomic publish (manifest last)."""

from __future__ import annotations

import json
from pathlib import Path

from optimodel import artifact, storage
from optimodel.artifact import EngineInfo, Manifest
from optimodel.build import BuildReason, BuildRequest
from optimodel.cache_key import toolchain_versions
from optimodel.spec import Precision, TensorSpec

from builder_job.compile import Compiled
from builder_job.errors import BuildError


def write_report(out_dir: Path, report: dict) -> Path:
    path = out_dir / artifact.REPORT
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return path


def make_manifest(request: BuildRequest, compiled: Compiled, precision: Precision,
                  outputs: list[TensorSpec]) -> Manifest:
    versions = {**toolchain_versions(request.target), **compiled.versions}
    return Manifest(
        cache_key=request.cache_key,
        model_name=request.model_name,
        namespace=request.namespace,
        arch=request.target.arch,
        product=compiled.product or request.target.product,
        compute_capability=compiled.compute_capability,
        engine=EngineInfo(file=compiled.engine_file, format=compiled.format, precision=precision,
                          session_options=compiled.session_options),
        inputs=request.source.inputs,
        outputs=outputs,
        max_batch_size=request.max_batch_size,
        versions=versions,
        files=[],  # artifact.publish lists what is really in the directory
    )


def publish_artifact(out_dir: Path, manifest: Manifest, request: BuildRequest) -> str:
    try:
        return artifact.publish(out_dir, manifest, request.artifact_uri, base_dir=request.base_dir)
    except (storage.StorageError, artifact.ArtifactError, OSError, ValueError) as exc:
        raise BuildError(BuildReason.PUBLISH_FAILED, f"publishing to {request.artifact_uri} failed: {exc}") from exc


def read_timing_cache(request: BuildRequest) -> bytes | None:
    """The arch's TensorRT timing cache from the store; None when there is none yet or it is unreadable."""
    if not request.timing_cache_uri:
        return None
    try:
        if not storage.exists(request.timing_cache_uri, request.base_dir):
            return None
        return storage.read_bytes(request.timing_cache_uri, request.base_dir)
    except Exception:
        return None


def save_timing_cache(request: BuildRequest, data: bytes | None) -> str | None:
    """Store the grown timing cache; a failure here costs the next build time, never this build."""
    if not request.timing_cache_uri or not data:
        return None
    try:
        storage.write_bytes_atomic(request.timing_cache_uri, data, request.base_dir)
        return request.timing_cache_uri
    except Exception as exc:
        return f"not saved: {exc}"
