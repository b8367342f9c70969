"""Fixtures for the server tests: a published digits artifact and real HTTP servers.

Artifacts are written here by hand (copy the ONNX, build a Manifest, publish): the
server tests must not depend on the builder.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimodel_local import run as local_run
from optimodel.artifact import EngineInfo, Manifest, open_artifact, publish
from optimodel.batching import BatchingConfig, write_batching_config
from optimodel.spec import TensorSpec
from tests.net import free_port

ROOT_DIR = Path(__file__).resolve().parents[2]
MODEL = "digits"
MAX_BATCH = 32


def make_artifact(onnx: Path, dest: Path, name: str = MODEL, max_batch: int = MAX_BATCH) -> Path:
    staging = dest.parent / f"{dest.name}-src"
    staging.mkdir(parents=True)
    shutil.copy(onnx, staging / "model.onnx")
    manifest = Manifest(
        cache_key="test" + "0" * 60, model_name=name, arch="cpu",
        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32",
                          session_options={"graph_optimization_level": "all"}),
        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
        max_batch_size=max_batch, versions={"onnxruntime": ort.__version__}, files=[],
    )
    publish(staging, manifest, dest.as_uri())
    return dest


@pytest.fixture(scope="session")
def digits_artifact(digits_build, tmp_path_factory) -> Path:
    return make_artifact(digits_build / "digits_cnn.onnx", tmp_path_factory.mktemp("store") / "digits")


@pytest.fixture(scope="session")
def digits_images(digits_build) -> np.ndarray:
    data = np.load(digits_build / "digits_test.npz")
    key = next(k for k in data.files if data[k].dtype == np.float32 and data[k].ndim == 4)
    return np.ascontiguousarray(data[key][:64])


@pytest.fixture(scope="session")
def reference(digits_build):
    """The ONNX run directly with onnxruntime: what the server must answer."""
    session = ort.InferenceSession(str(digits_build / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": x})[0]


def sample(text: str, name: str, **labels) -> float | None:
    """Value of one sample in a Prometheus exposition (model/arch labels implied)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"model": MODEL, "arch": "cpu", **labels}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return s.value
    return None


def wait_ready(url: str, timeout: float = 30.0, proc=None) -> None:
    local_run.wait_ready(proc, url, timeout_s=timeout, poll_s=0.05)


class ThreadedServer:
    """The server as `python -m serving_image` runs it (app startup, HTTP server on uvloop, graceful stop),
    in a background thread of the test process."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop = self.stop_event = None
        self.error: BaseException | None = None
        self.listening = threading.Event()

    def _run(self) -> None:
        import uvloop

        async def main():
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            server = self.app.http_server()
            await server.listen("127.0.0.1", self.port)
            self.listening.set()
            await self.app.serve(server, self.stop_event, graceful_s=10.0)

        try:
            uvloop.run(main())
        except BaseException as exc:  # reported by __exit__, not lost in the thread
            self.error = exc
        finally:
            self.listening.set()

    def start(self) -> "ThreadedServer":
        """Start and return once it listens (not yet ready: warm-up runs on)."""
        self.thread.start()
        assert self.listening.wait(30) and self.error is None, self.error
        return self

    def __enter__(self):
        self.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc):
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not stop"
        assert self.error is None, self.error


@pytest.fixture
def serve(digits_artifact, tmp_path):
    """serve(max_wait_ms=..., max_batch_size=..., **create_app kwargs) -> running ThreadedServer."""
    from serving_image.app import create_app
    from serving_image.backends import load_backend

    started = []

    def start(max_wait_ms: float = 2.0, max_batch_size: int = MAX_BATCH, max_queue: int = 1024,
              threads: int = 1, **kwargs) -> ThreadedServer:
        local, manifest = open_artifact(digits_artifact.as_uri())
        config = BatchingConfig(max_wait_ms=max_wait_ms, max_batch_size=max_batch_size, max_queue=max_queue)
        config_path = tmp_path / f"config{len(started)}" / "batching.json"
        write_batching_config(config_path, config)
        app = create_app(load_backend(local, manifest, threads=threads), manifest, config,
                         config_path=config_path, **kwargs)
        srv = ThreadedServer(app).__enter__()
        srv.config_path = config_path
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)


class SlowBackend:
    """A real engine plus a fixed delay per call: a known capacity to overload."""

    def __init__(self, inner, delay: float = 0.02):
        self.inner, self.delay = inner, delay
        for attr in ("platform", "arch", "max_batch_size", "inputs", "outputs"):
            setattr(self, attr, getattr(inner, attr))

    def run(self, feeds):
        time.sleep(self.delay)
        return self.inner.run(feeds)

    def close(self):
        self.inner.close()


@contextlib.contextmanager
def app_server(artifact: Path, config: BatchingConfig, *, grpc: bool = False, wrap_backend=None, **kwargs):
    """A real HTTP (and, with grpc=True, gRPC) server in this process over the artifact's ONNX Runtime
    engine (one thread); `srv.grpc` is its gRPC address. wrap_backend(backend) may slow or gate the engine."""
    from serving_image.app import create_app
    from serving_image.backends import load_backend

    local, manifest = open_artifact(artifact.as_uri())
    backend = load_backend(local, manifest, threads=1)
    if wrap_backend is not None:
        backend = wrap_backend(backend)
    grpc_port = free_port() if grpc else None
    app = create_app(backend, manifest, config, grpc_port=grpc_port, **kwargs)
    with ThreadedServer(app) as srv:
        srv.grpc = f"127.0.0.1:{grpc_port}" if grpc else None
        yield srv


def start_server_process(artifact: Path, config: Path, port: int, *extra: str, log=None) -> subprocess.Popen:
    """`python -m serving_image` as a pod runs it (one engine thread). log: a file for its output, else a
    text pipe; a file for long runs, since a full pipe nobody reads would block the server's logging."""
    cmd = [sys.executable, "-m", "serving_image", "--artifact", str(artifact), "--config", str(config),
           "--port", str(port), "--threads", "1", *extra]
    if log is not None:
        return subprocess.Popen(cmd, cwd=ROOT_DIR, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.Popen(cmd, cwd=ROOT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
