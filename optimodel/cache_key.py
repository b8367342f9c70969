"""The cache key: one engine per (model digest, options, target, toolchain).

Same key means the same engine, so an artifact published under a key is reused
and no build runs. Only what changes the engine goes in: serving settings like
replicas or maxWaitMs must not cause a rebuild, maxBatchSize does (it bounds the
TensorRT optimization profile and the latency profile).
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
        "target": {"arch": target.arch, "product": target.product},
        "toolchain": dict(sorted(toolchain.items())),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
