"""`optimodel run` of a manifest with autotune on, as a subprocess whose decision lines the tests read."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = 80.0  # a window far over the SLO's budget
SLO = 50.0    # margin for a CPU shared with other test runs: p99 swings by tens of ms here
LINE = re.compile(r"p99 (?P<p99>\S+) ms vs SLO (?P<slo>\S+) ms .* window (?P<old>\S+) (?P<arrow>[→=]) "
                  r"(?P<new>\S+) ms\s+(?P<reason>[A-Za-z]+):")


def upper(p99: str) -> float:
    """The upper bound of a printed p99 interval ("12–14", ">1000")."""
    return float("inf") if p99.startswith(">") else float(p99.split("–")[1])


class OptimodelRun:
    """Starts `optimodel run MANIFEST --store … --port … ARGS`, collects stdout lines, stops it with SIGTERM."""

    def __init__(self, manifest: Path, store: Path, port: int, *args: str):
        self.argv = [sys.executable, "-m", "optimodel", "run", str(manifest), "--store", str(store),
                     "--port", str(port), *args]
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "OptimodelRun":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("Serving "):
                self.ready.set()

    def wait_ready(self, timeout: float = 240) -> None:
        if not self.ready.wait(timeout):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise AssertionError(f"`optimodel run` served no endpoint within {timeout:g} s; stderr: {err}")

    def decisions(self) -> list[re.Match]:
        return [m for m in map(LINE.search, list(self.lines)) if m]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
