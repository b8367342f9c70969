"""TorchServe 0.12 beside our server in bench/serving.py (--torchserve): same ONNX MLP, same client.

TorchServe lives in its own venv (build/ts-venv, made by `make torchserve-venv`: it pins its own
dependencies); a .pth file there lends it this project's numpy and ONNX Runtime. The Java frontend
(Java 17) batches (batchSize 32, maxBatchDelay 5 ms: our window) and hands batches to one Python
worker running bench/_torchserve_handler.py on ONNX Runtime with one thread, as our default does here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import time
from pathlib import Path

from _proc import free_port, tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "build" / "ts-venv"


def available() -> str | None:
    """None when TorchServe can run here, else why not."""
    if not (VENV / "bin" / "torchserve").exists():
        return f"no TorchServe venv at {VENV} (make torchserve-venv)"
    if shutil.which("java") is None:
        return "no java on PATH (TorchServe 0.12 needs Java 11+)"
    return None


class TorchServeProcess:
    """The ServerProcess interface bench/serving.py's max_rate and cpu_per_request use."""

    def __init__(self, onnx: Path, workdir: Path, max_batch: int, max_wait_ms: float, threads: int = 1):
        self.port, mport, metrics_port = free_port(), free_port(), free_port()
        store = workdir / "ts-store"
        store.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VENV / "bin" / "torch-model-archiver"), "--model-name", "mlp", "--version", "1.0",
                        "--serialized-file", str(onnx), "--handler", str(ROOT / "bench" / "_torchserve_handler.py"),
                        "--export-path", str(store), "--force"], check=True)
        models = {"mlp": {"1.0": {"defaultVersion": True, "marName": "mlp.mar", "minWorkers": 1, "maxWorkers": 1,
                                  "batchSize": max_batch, "maxBatchDelay": int(max_wait_ms),
                                  "responseTimeout": 120}}}
        config = workdir / "ts-config.properties"
        config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.port}",
            f"management_address=http://127.0.0.1:{mport}",
            f"metrics_address=http://127.0.0.1:{metrics_port}",
            f"model_store={store}", "load_models=mlp.mar", f"models={json.dumps(models)}",
            "disable_token_authorization=true", "default_workers_per_model=1", "job_queue_size=4096",
            "disable_system_metrics=true", "vmargs=-Xmx1g",
        ]) + "\n")
        self.log = open(workdir / "torchserve.log", "w")
        env = {**os.environ, "OPTIMODEL_BENCH_THREADS": str(threads), "LOG_LOCATION": str(workdir / "ts-logs"),
               "METRICS_LOCATION": str(workdir / "ts-logs"), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
        self.proc = subprocess.Popen([str(VENV / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
                                      "--ts-config", str(config), "--model-store", str(store),
                                      "--disable-token-auth"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=workdir)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ping", timeout=2).status_code == 200:
                    body = b"\0" * 1024
                    r = httpx.post(f"http://127.0.0.1:{self.port}/predictions/mlp", content=body, timeout=30)
                    if r.status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"TorchServe not serving after {timeout} s; see {self.log.name}")

    def wait_idle(self) -> None:
        time.sleep(0.5)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        started = descendants(self.proc.pid)  # the JVM and its Python worker, which may outlive SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                out += kids
                todo += kids
        except FileNotFoundError:
            continue
    return out
