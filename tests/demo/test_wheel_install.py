"""`optimodel demo` from a plain install: the built wheel in a fresh venv, run far from the checkout.

Slow by nature (a venv with torch, onnxruntime and matplotlib, then a real demo with short phases);
the packages come from pip's cache after the first run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what a checkout has that a source tree to build from does not need
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".optimodel",
                                    "optimodel-demo", ".pytest_cache", "bench", "tests", "charts", "crds")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
    started = time.monotonic()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], timeout=300)
    wheel = next((tmp_path / "dist").glob("optimodel-*.whl"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    run([*pip, "torch==2.13.0"], timeout=600)  # the CPU wheel on local disk, before anything asks for torch
    run([*pip, f"{wheel}[demo]"], timeout=900)
    installed = time.monotonic()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="80", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = run([str(venv / "bin" / "python"), "-c", "import optimodel_examples, optimodel_local; "
                 "print(optimodel_examples.__file__); print(optimodel_local.__file__)"], cwd=work, env=env)
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout

    result = subprocess.run([str(venv / "bin" / "optimodel"), "demo", "--once", "--phase-seconds", "5",
                             "--tune-interval", "2", "--port", str(_free_port())],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)
    done = time.monotonic()
    print(f"wheel + venv: {installed - started:.0f}s, demo: {done - installed:.0f}s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((work / "optimodel-demo" / "report.json").read_text())
    assert report["gate"]["passed"] is True and report["rejected"] == 0
    assert (work / "optimodel-demo" / "report.png").stat().st_size > 20_000
    assert (work / "optimodel-demo" / "build" / "digits_meta.json").exists()  # the shipped data maker ran
    package = Path(where.stdout.split()[0]).parent
    assert not (package / "build").exists(), "the demo wrote into the installed package"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
