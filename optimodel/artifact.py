"""Artifact layout and manifest: `<store>/<namespace>/<name>/<cacheKey>/`.

The directory holds the engine, the optimized ONNX, report.json and manifest.json.
manifest.json is written last and lists every other file with its sha256: it is
the commit point. A reader trusts a directory only when the manifest is there and
every checksum matches; anything else is an unfinished or damaged build.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from optimodel import storage
from optimodel.cache_key import file_sha256
from optimodel.spec import Precision, TensorSpec

MANIFEST = "manifest.json"
REPORT = "report.json"
MANIFEST_VERSION = "optimodel.io/artifact/v1"


class ArtifactError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class FileEntry(_Wire):
    path: str
    sha256: str
    size: int


class EngineInfo(_Wire):
    file: str = Field(description="Path of the engine inside the artifact directory.")
    format: Literal["onnx", "tensorrt"]
    precision: Precision
    # ONNX Runtime session settings chosen at build time (graph optimization level,
    # execution mode); thread counts are decided by the server from its CPU quota.
    session_options: dict[str, str | int | bool] = Field(default_factory=dict)


class Manifest(_Wire):
    api_version: str = MANIFEST_VERSION
    cache_key: str
    model_name: str
    namespace: str = "default"
    arch: str
    product: str | None = None
    compute_capability: str | None = None
    engine: EngineInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    versions: dict[str, str]
    files: list[FileEntry]
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def artifact_uri(store_uri: str, namespace: str, name: str, key: str) -> str:
    return storage.join(store_uri, namespace, name, key)


def timing_cache_uri(store_uri: str, arch: str, tensorrt: str) -> str:
    """The TensorRT timing cache shared by every build of one architecture and TensorRT version
    (a cache from another version or architecture is rejected by TensorRT, so it is never shared)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in tensorrt)
    return storage.join(store_uri, "_timing-cache", arch, f"tensorrt-{safe}.cache")


def list_files(local_dir: Path) -> list[FileEntry]:
    entries = []
    for file in sorted(local_dir.rglob("*")):
        if file.is_file() and file.name != MANIFEST:
            entries.append(FileEntry(path=file.relative_to(local_dir).as_posix(),
                                     sha256=file_sha256(file), size=file.stat().st_size))
    return entries


def publish(local_dir: Path, manifest: Manifest, dest_uri: str, base_dir: Path | None = None) -> str:
    """Publish a finished build directory so readers see all of it or none of it.

    `manifest.files` is (re)computed here from what is really in local_dir. On a
    local or mounted store the directory is staged beside the target and renamed
    into place; on an object store the files go first and the manifest last.
    """
    manifest = manifest.model_copy(update={"files": list_files(local_dir)})
    blob = json.dumps(manifest.wire(), indent=2, sort_keys=True).encode()
    if storage.is_local(dest_uri):
        target = storage.local_path(dest_uri, base_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.staging"
        shutil.copytree(local_dir, staging)
        (staging / MANIFEST).write_bytes(blob)
        if target.exists():
            # a directory without a valid manifest is an interrupted earlier attempt
            try:
                verify_local(target)
                shutil.rmtree(staging)
                return dest_uri
            except ArtifactError:
                shutil.rmtree(target)
        os.rename(staging, target)
        return dest_uri
    storage.upload_dir(local_dir, dest_uri, skip=(MANIFEST,))
    storage.write_bytes_atomic(storage.join(dest_uri, MANIFEST), blob)
    return dest_uri


def read_manifest(local_dir: Path) -> Manifest:
    path = local_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError("ManifestMissing", f"{local_dir} has no {MANIFEST}: the build did not finish")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ArtifactError("ManifestInvalid", f"{path} is not a valid manifest: {exc}") from exc


def verify_local(local_dir: Path) -> Manifest:
    """The manifest of local_dir when every listed file is present with its checksum."""
    manifest = read_manifest(local_dir)
    for entry in manifest.files:
        file = local_dir / entry.path
        if not file.is_file():
            raise ArtifactError("FileMissing", f"{file} is listed in the manifest but missing")
        if file.stat().st_size != entry.size or file_sha256(file) != entry.sha256:
            raise ArtifactError("ChecksumMismatch", f"{file} does not match its sha256 in the manifest")
    if manifest.engine.file not in {e.path for e in manifest.files}:
        raise ArtifactError("ManifestInvalid", f"engine file {manifest.engine.file} is not listed in the manifest")
    return manifest


def open_artifact(uri: str, cache_dir: Path | None = None, base_dir: Path | None = None) -> tuple[Path, Manifest]:
    """A verified local copy of the artifact at uri: (directory, manifest)."""
    if storage.is_local(uri):
        local = storage.local_path(uri, base_dir)
        if not local.is_dir():
            raise ArtifactError("ArtifactMissing", f"no artifact at {uri}")
        return local, verify_local(local)
    cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="optimodel-artifact-"))
    if not storage.exists(storage.join(uri, MANIFEST)):
        raise ArtifactError("ManifestMissing", f"{uri} has no {MANIFEST}: the build did not finish")
    storage.download_dir(uri, cache_dir)
    return cache_dir, verify_local(cache_dir)


def is_published(uri: str, base_dir: Path | None = None, *, pvc_root: str | None = None) -> bool:
    """True when a verified artifact is at uri (a cache hit). pvc_root: see storage.resolve."""
    try:
        if storage.is_local(uri):
            verify_local(storage.local_path(uri, base_dir, pvc_root=pvc_root))
        else:
            read = storage.read_bytes(storage.join(uri, MANIFEST))
            Manifest.model_validate_json(read)
        return True
    except (ArtifactError, storage.StorageError, ValueError, OSError):
        return False
