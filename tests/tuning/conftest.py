"""Fixtures of the tuning tests: a copy of the digits build and a manifest that tunes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.tuning.optimodel_run import ROOT, SLO, START


@pytest.fixture
def tuned_manifest(digits_build, tmp_path) -> Path:
    shutil.copytree(digits_build, tmp_path / "build")
    doc = yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text())
    # a window far too long for the SLO: the tuner must bring p99 under it
    doc["spec"]["serving"]["batching"] = {"maxWaitMs": START, "autotune": {
        "enabled": True, "p99LatencyMs": SLO, "minWaitMs": 0, "maxWaitMs": 100, "intervalSeconds": 5}}
    path = tmp_path / "digits-tuned.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
