"""The cache key: one engine per (model digest, options, target, toolchain).

Same key means the same engine, so an artifact published under a key is reused
and no build runs. Only what changes the engine goes in: serving settings like
replicas or maxWaitMs must not cause a rebuild, maxBatchSize does (it bounds the
TensorRT optimization profile and the latency profile).

The target part is the architecture (engines, builder Jobs and Deployments are all
one per architecture, and a TensorRT engine runs on every GPU of its compute
capability, so the GPU product is not in the key) and, for the CPU, the
instruction-set class the INT8 recipe is made for (optimodel.target). The toolchain
part is what the builder image has: its declared versions or its image reference
(builder_toolchain); the builder refuses a request whose declared versions are not
its own (BuildReason.TOOLCHAIN_MISMATCH), so a key never names an engine another
toolchain made.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from optimodel.spec import ModelSource, Optimization
from optimodel.target import Target

# What each target's engine is made with; versions are read from the installed
# distributions without importing them (importing torch takes seconds).
TOOLCHAIN_PACKAGES = {
    "cpu": ("onnx", "onnxruntime", "torch"),
    "gpu": ("onnx", "onnxruntime", "torch", "tensorrt"),
}


def builder_toolchain(image: str, versions: dict[str, str] | None) -> dict[str, str]:
    """The toolchain part of a key in a cluster: the versions the builder image declares
    (baked in at image build time and passed by the chart), else the image reference itself
    (a digest when pinned as image@sha256:…; a tag is trusted not to be moved)."""
    if versions:
        return {str(k): str(v) for k, v in versions.items()}
    return {"builderImage": image}


def toolchain_versions(target: Target) -> dict[str, str]:
    versions = {}
    for dist in TOOLCHAIN_PACKAGES[target.kind]:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def model_digest(source: ModelSource, local_file: Path | None = None) -> str:
    """sha256 of the model: the declared one, else the file's, else the URI itself.

    Without a declared sha256 a remote model is keyed by its URI: overwriting the
    object in place does not rebuild. Declare sha256 to pin content.
    """
    if source.sha256:
        return f"sha256:{source.sha256}"
    if local_file is not None and local_file.is_file():
        return f"sha256:{file_sha256(local_file)}"
    return f"uri:{source.uri}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_options(source: ModelSource, optimization: Optimization, max_batch_size: int) -> dict:
    options = {
        "format": source.format,
        "entrypoint": source.entrypoint,
        "inputs": [t.wire() for t in source.inputs],
        "optimization": optimization.wire(),
        "maxBatchSize": max_batch_size,
    }
    if source.code is not None:
        # the code builds the module: other code, other engine (pin content with code.sha256)
        options["code"] = f"sha256:{source.code.sha256}" if source.code.sha256 else f"uri:{source.code.uri}"
    return options


def cache_key(digest: str, options: dict, target: Target, toolchain: dict[str, str]) -> str:
    payload = {
        "model": digest,
        "options": options,
        "target": target_part(target),
        "toolchain": dict(sorted(toolchain.items())),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def target_part(target: Target) -> dict[str, str]:
    if target.kind == "cpu":
        return {"arch": "cpu", "cpuClass": target.resolved().cpu_class}
    return {"arch": target.arch}


def toolchain_mismatch(declared: dict[str, str], target: Target) -> dict[str, tuple[str, str]]:
    """{package: (declared, installed)} for every declared package version this environment does not have.
    Keys that are not packages (builderImage) are not checked here: the pod runs that image."""
    installed = toolchain_versions(target)
    out = {}
    for dist, version in declared.items():
        if dist == "builderImage":
            continue
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = installed.get(dist, "absent")
        if have != version:
            out[dist] = (version, have)
    return out
