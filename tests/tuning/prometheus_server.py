"""A real Prometheus (the Debian package's binary) on 127.0.0.1 with its own config and data dir."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from tests.net import free_port


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (Path("/usr/bin/prometheus").exists() and "/usr/bin/prometheus")
    if not found:
        pytest.skip("the prometheus binary is not installed (make setup installs the Debian package where apt-get "
                    "exists: apt-get install prometheus)")
    return found


class Prometheus:
    """Scrapes the given targets every second; `namespace` is a target label, as a PodMonitor adds it."""

    def __init__(self, workdir: Path, targets: list[str], namespace: str = "test", port: int | None = None):
        self.binary = prometheus_binary()
        self.workdir, self.targets, self.namespace = workdir, targets, namespace
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "optimodel", "scrape_interval": "1s", "scrape_timeout": "900ms",
                                      "static_configs": [{"targets": targets,
                                                          "labels": {"namespace": namespace}}]}]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    def start(self, timeout_s: float = 60) -> "Prometheus":
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "prometheus.log", "ab"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                                   f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def wait_for_series(self, metric: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.url}/api/v1/query", params={"query": metric}, timeout=2).json()
            if r["data"]["result"]:
                return
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never scraped {metric}")
