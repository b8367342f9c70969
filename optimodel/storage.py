"""Store URIs: one entry point per operation, one resolver per scheme, fsspec underneath.

Schemes: file:// (absolute, or ./relative to a base directory), pvc://<claim>/<path>
(a PersistentVolumeClaim mounted at $OPTIMODEL_PVC_ROOT/<claim>, default /mnt/pvc),
s3://, gs:// (through s3fs / gcsfs when installed), http(s):// (read only).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import fsspec

SUPPORTED_SCHEMES = ("file", "pvc", "s3", "gs", "http", "https")
READ_ONLY_SCHEMES = ("http", "https")


class StorageError(Exception):
    """A store URI could not be used; `reason` is a CamelCase code for status and logs."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_uri(uri: str) -> None:
    """Raise ValueError naming the scheme when a URI cannot be a store URI."""
    parsed = urlparse(uri)
    if parsed.scheme not in SUPPORTED_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        raise ValueError(f"unsupported URI scheme '{parsed.scheme or '(none)'}' in '{uri}'; allowed: {allowed}")
    if parsed.scheme == "pvc" and not parsed.netloc:
        raise ValueError(f"pvc URI needs a claim name: pvc://<claim>/<path>, got '{uri}'")
    if parsed.scheme in ("s3", "gs") and not parsed.netloc:
        raise ValueError(f"{parsed.scheme} URI needs a bucket: {parsed.scheme}://<bucket>/<key>, got '{uri}'")
    if parsed.scheme == "file" and not (uri.startswith("file:///") or uri.startswith("file://./") or uri.startswith("file://../")):
        raise ValueError(f"file URI must be file:///absolute/path or file://./relative/path, got '{uri}'")


def _pvc_root(pvc_root: str | os.PathLike | None = None) -> Path:
    return Path(pvc_root if pvc_root is not None else os.environ.get("OPTIMODEL_PVC_ROOT", "/mnt/pvc"))


def resolve(uri: str, base_dir: str | os.PathLike | None = None, *,
            pvc_root: str | os.PathLike | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a store URI. Relative file:// paths resolve against base_dir; pvc://
    claims are mounted under pvc_root (None: $OPTIMODEL_PVC_ROOT, as the pods get it; the operator
    passes its own setting)."""
    check_uri(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme == "file":
        raw = uri[len("file://"):]
        path = Path(raw) if raw.startswith("/") else Path(base_dir or os.getcwd()) / raw
        return fsspec.filesystem("file"), str(path.resolve())
    if scheme == "pvc":
        path = _pvc_root(pvc_root) / parsed.netloc / parsed.path.lstrip("/")
        return fsspec.filesystem("file"), str(path)
    if scheme in ("s3", "gs"):
        try:
            fs = fsspec.filesystem(scheme)
        except ImportError as exc:
            raise StorageError("StoreUnavailable", f"{scheme}:// needs the package {'s3fs' if scheme == 's3' else 'gcsfs'}: {exc}") from exc
        return fs, f"{parsed.netloc}{parsed.path}"
    return fsspec.filesystem(scheme), uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("file", "pvc")


def local_path(uri: str, base_dir: str | os.PathLike | None = None, *,
               pvc_root: str | os.PathLike | None = None) -> Path:
    """Filesystem path of a file:// or pvc:// URI."""
    if not is_local(uri):
        raise StorageError("NotLocal", f"'{uri}' is not on a local or mounted filesystem")
    return Path(resolve(uri, base_dir, pvc_root=pvc_root)[1])


def fetch(uri: str, dest: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """Copy the object at `uri` to the local file `dest`, failing with FetchFailed or Unauthorized."""
    fs, path = resolve(uri, base_dir)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(path, str(dest))
    except FileNotFoundError as exc:
        raise StorageError("FetchFailed", f"model not found at {uri}") from exc
    except PermissionError as exc:
        raise StorageError("Unauthorized", f"access denied to {uri}: {exc}") from exc
    except Exception as exc:  # fsspec back ends raise their own errors; keep the message
        text = str(exc)
        if any(code in text for code in ("401", "403", "Forbidden", "AccessDenied", "Unauthorized")):
            raise StorageError("Unauthorized", f"access denied to {uri}: {text}") from exc
        raise StorageError("FetchFailed", f"could not fetch {uri}: {text}") from exc
    return dest


def exists(uri: str, base_dir: str | os.PathLike | None = None) -> bool:
    fs, path = resolve(uri, base_dir)
    try:
        return fs.exists(path)
    except Exception:
        return False


def read_bytes(uri: str, base_dir: str | os.PathLike | None = None, *,
               pvc_root: str | os.PathLike | None = None) -> bytes:
    fs, path = resolve(uri, base_dir, pvc_root=pvc_root)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError("FetchFailed", f"not found: {uri}") from exc


def write_bytes_atomic(uri: str, data: bytes, base_dir: str | os.PathLike | None = None) -> None:
    """Write a whole object so a reader sees the old content or the new, never a part."""
    if urlparse(uri).scheme in READ_ONLY_SCHEMES:
        raise StorageError("ReadOnlyStore", f"{uri} is read only")
    fs, path = resolve(uri, base_dir)
    if is_local(uri):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    # object stores: a single PUT is atomic for the object
    with fs.open(path, "wb") as f:
        f.write(data)


def upload_dir(local_dir: str | os.PathLike, uri: str, base_dir: str | os.PathLike | None = None,
               skip: tuple[str, ...] = ()) -> None:
    """Upload every file of local_dir under uri (not atomic by itself; see artifact.publish)."""
    if urlparse(uri).scheme in READ_ONLY_SCHEMES:
        raise StorageError("ReadOnlyStore", f"{uri} is read only")
    fs, root = resolve(uri, base_dir)
    for file in sorted(Path(local_dir).rglob("*")):
        if file.is_file() and file.name not in skip:
            rel = file.relative_to(local_dir).as_posix()
            fs.makedirs(f"{root}/{Path(rel).parent.as_posix()}".rstrip("/."), exist_ok=True)
            fs.put_file(str(file), f"{root}/{rel}")


def download_dir(uri: str, local_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    fs, root = resolve(uri, base_dir)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(dest))
    return local_dir
