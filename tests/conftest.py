"""Shared fixtures and the `gpu` marker's skip rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_BUILD = ROOT / "examples" / "build"


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_build() -> Path:
    """examples/build with the trained digits CNN, its ONNX and its datasets (made once)."""
    if not (EXAMPLES_BUILD / "digits_meta.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_digits.py")], check=True)
    return EXAMPLES_BUILD
