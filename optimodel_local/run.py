"""`optimodel run`: the cluster flow on one machine.

The builder runs as a local process (`python -m builder_job`), its artifact goes
to a local store (default ./.optimodel), and the server (`python -m serving_image`)
listens on 127.0.0.1. The same manifest works in a cluster unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from optimodel import storage
from optimodel.artifact import artifact_uri
from optimodel.batching import BatchingConfig, write_batching_config
from optimodel.build import BuildRequest, BuildResult
from optimodel.cache_key import cache_key, canonical_options, file_sha256, model_digest, toolchain_versions
from optimodel.spec import ModelSource, OptimizedModel
from optimodel.target import CPU

DEFAULT_STORE = Path(".optimodel")


class LocalRunError(Exception):
    """A local run stopped; exit_code follows the CLI's convention (1 build, 3 serve)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LocalBuild:
    request: BuildRequest
    result: BuildResult
    artifact_dir: Path


def plan_build(model: OptimizedModel, manifest_dir: Path, store_dir: Path) -> BuildRequest:
    spec = model.spec
    namespace = model.metadata.namespace or "default"
    local_model = None
    if storage.is_local(spec.model.uri):
        local_model = storage.local_path(spec.model.uri, manifest_dir)
    digest = model_digest(spec.model, local_model)
    source = _pin_local_code(spec.model, manifest_dir)
    options = canonical_options(source, spec.optimization, spec.serving.max_batch_size)
    key = cache_key(digest, options, CPU, toolchain_versions(CPU))
    store_uri = f"file://{store_dir.resolve()}"
    return BuildRequest(
        namespace=namespace,
        model_name=model.metadata.name,
        source=source,
        optimization=spec.optimization,
        target=CPU,
        max_batch_size=spec.serving.max_batch_size,
        cache_key=key,
        artifact_uri=artifact_uri(store_uri, namespace, model.metadata.name, key),
        base_dir=str(manifest_dir.resolve()),
    )


def _pin_local_code(source: ModelSource, manifest_dir: Path) -> ModelSource:
    """A local spec.model.code without sha256 gets its file's: an edit to the code rebuilds, and the
    builder checks that it builds the code the key was made from."""
    code = source.code
    if code is None or code.sha256 or not storage.is_local(code.uri):
        return source
    path = storage.local_path(code.uri, manifest_dir)
    if not path.is_file():
        return source  # the builder reports FetchFailed naming the file
    return source.model_copy(update={"code": code.model_copy(update={"sha256": file_sha256(path)})})


def run_build(request: BuildRequest, work_dir: Path) -> LocalBuild:
    request_file, result_file = write_request(request, work_dir)
    proc = subprocess.run(builder_command(request_file, result_file), env=child_env())
    return read_result(request, result_file, proc.returncode)


def write_request(request: BuildRequest, work_dir: Path) -> tuple[Path, Path]:
    """The builder's request file, and where its result will be (removed first: a stale one means nothing)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    request_file = work_dir / f"{request.cache_key}.request.json"
    result_file = work_dir / f"{request.cache_key}.result.json"
    request_file.write_text(request.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    result_file.unlink(missing_ok=True)
    return request_file, result_file


def builder_command(request_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "builder_job", "--request", str(request_file), "--result", str(result_file)]


def read_result(request: BuildRequest, result_file: Path, returncode: int | None) -> LocalBuild:
    if not result_file.exists():
        raise LocalRunError(f"the builder exited with code {returncode} without a result; see its log above")
    result = BuildResult.model_validate_json(result_file.read_text())
    if result.state != "Succeeded":
        raise LocalRunError(f"build failed: {result.reason.value}: {result.message}")
    return LocalBuild(request, result, storage.local_path(request.artifact_uri))


def child_env() -> dict[str, str]:
    # No PYTHONPATH here: the builder puts the manifest's folder on sys.path itself, so a
    # folder of the user's cannot shadow a module the interpreter needs at start-up.
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def start_server(model: OptimizedModel, build: LocalBuild, store_dir: Path, host: str, port: int,
                 new_session: bool = False, log: IO | None = None) -> subprocess.Popen:
    """new_session: the server leaves the terminal's process group, so a Ctrl-C reaches only the caller,
    which stops it in order (the demo does). log: where its output goes (default: this terminal)."""
    if not port_free(host, port):
        raise LocalRunError(f"port {port} on {host} is in use; pick another with --port", exit_code=3)
    serving = model.spec.serving
    config_file = batching_file(store_dir, build)
    write_batching_config(config_file, BatchingConfig(
        max_wait_ms=serving.batching.max_wait_ms, max_batch_size=serving.max_batch_size, max_queue=serving.max_queue))
    cmd = [sys.executable, "-m", "serving_image", "--artifact", str(build.artifact_dir), "--config", str(config_file),
           "--host", host, "--port", str(port), "--model-name", model.metadata.name]
    slo = serving.batching.autotune.p99_latency_ms
    if slo:  # the SLO is the admission deadline: a later answer helps nobody
        cmd += ["--deadline-ms", f"{slo:g}"]
    return subprocess.Popen(cmd, env=child_env(), start_new_session=new_session, stdout=log,
                            stderr=subprocess.STDOUT if log else None)


def batching_file(store_dir: Path, build: LocalBuild) -> Path:
    """The batching config the local server watches and the tuner writes."""
    return store_dir / build.request.namespace / build.request.model_name / "batching.json"


def wait_ready(proc: subprocess.Popen | None, base_url: str, timeout_s: float = 180.0, poll_s: float = 0.2) -> None:
    """Poll /v2/health/ready until 200; fail early when the server process (if any) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalRunError(f"the server exited with code {proc.returncode} before it was ready", exit_code=3)
        try:
            if httpx.get(f"{base_url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    if proc is not None:
        proc.terminate()
    raise LocalRunError(f"the server was not ready within {timeout_s:.0f}s", exit_code=3)


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def summary(build: LocalBuild) -> str:
    r = build.result
    parts = [f"engine {r.cache_key[:12]} ({'cache hit' if r.reason.value == 'CacheHit' else 'built'})"]
    if r.accuracy:
        parts.append(f"{r.accuracy.metric} {r.accuracy.original:.4f} → {r.accuracy.optimized:.4f}")
    report = build.artifact_dir / "report.json"
    if report.exists():
        try:
            data = json.loads(report.read_text())
            if "recipe" in data:
                parts.append(f"recipe {data['recipe']}")
        except ValueError:
            pass
    return ", ".join(parts)
