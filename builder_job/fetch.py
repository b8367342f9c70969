"""Fetch stage: copy the model (and datasets) from any store URI into the work directory."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from optimodel import storage
from optimodel.build import BuildReason
from optimodel.cache_key import file_sha256
from optimodel.spec import ModelCode, ModelSource

from builder_job.errors import BuildError

_STORAGE_REASONS = {
    "Unauthorized": BuildReason.UNAUTHORIZED,
    "FetchFailed": BuildReason.FETCH_FAILED,
}


def fetch_uri(uri: str, dest_dir: Path, base_dir: str | None, what: str = "model") -> Path:
    """Copy the object at uri into dest_dir, keeping its file name (loaders look at the suffix)."""
    name = Path(urlparse(uri).path).name or what
    dest = dest_dir / name
    try:
        storage.fetch(uri, dest, base_dir)
    except storage.StorageError as exc:
        reason = _STORAGE_REASONS.get(exc.reason, BuildReason.FETCH_FAILED)
        raise BuildError(reason, f"{what}: {exc}") from exc
    except ValueError as exc:  # an URI the contract does not accept
        raise BuildError(BuildReason.FETCH_FAILED, f"{what}: {exc}") from exc
    if not dest.is_file():
        # fsspec copies a directory URI without error and leaves no file
        raise BuildError(BuildReason.FETCH_FAILED, f"{what}: {uri} is not a file")
    return dest


def fetch_model(source: ModelSource, dest_dir: Path, base_dir: str | None) -> Path:
    path = fetch_uri(source.uri, dest_dir, base_dir, what="model")
    if source.sha256:
        actual = file_sha256(path)
        if actual != source.sha256:
            raise BuildError(BuildReason.CHECKSUM_MISMATCH,
                             f"model {source.uri} has sha256 {actual}, the spec declares {source.sha256}")
    return path


def fetch_code(code: ModelCode, dest_dir: Path, base_dir: str | None) -> Path:
    """The model's code (a .py file or an archive) unpacked into a folder for the import path."""
    path = fetch_uri(code.uri, dest_dir / "download", base_dir, what="model code")
    if code.sha256:
        actual = file_sha256(path)
        if actual != code.sha256:
            raise BuildError(BuildReason.CHECKSUM_MISMATCH,
                             f"model code {code.uri} has sha256 {actual}, the spec declares {code.sha256}")
    root = dest_dir / "src"
    root.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    try:
        if name.endswith(".py"):
            shutil.copyfile(path, root / path.name)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                archive.extractall(root)  # zipfile drops absolute paths and '..' itself
        else:
            with tarfile.open(path) as archive:
                archive.extractall(root, filter="data")  # refuses links and paths out of root
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"model code {code.uri} is not a readable {path.suffix} file: {type(exc).__name__}: {exc}") from exc
    return root
