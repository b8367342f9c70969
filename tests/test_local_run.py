"""`optimodel run` end to end: a real builder process, a real serving process on 127.0.0.1,
and tritonclient answers that match ONNX Runtime run directly on the same model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from optimodel_local.check import infer_with_tritonclient
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent


def start_run(manifest: Path, store: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "optimodel", "run", str(manifest), "--store", str(store), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def wait_for_endpoint(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("Serving "):
            return line.split(" at ", 1)[1].strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"optimodel run exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError("optimodel run printed no endpoint")


@pytest.fixture
def example_copy(digits_build, tmp_path) -> Path:
    """The example manifest beside a copy of the build folder, so a test may break files."""
    shutil.copytree(digits_build, tmp_path / "build")
    shutil.copy(ROOT / "examples" / "digits-cnn.yaml", tmp_path / "digits-cnn.yaml")
    return tmp_path / "digits-cnn.yaml"


@pytest.mark.slow
def test_run_serves_the_example_like_onnxruntime(example_copy, tmp_path):
    store, port = tmp_path / "store", free_port()
    proc = start_run(example_copy, store, port)
    try:
        endpoint = wait_for_endpoint(proc)
        assert endpoint == f"http://127.0.0.1:{port}/v2/models/digits-cnn/infer"
        data = np.load(tmp_path / "build" / "digits_test.npz")
        images = data["image"][:7]
        session = ort.InferenceSession(str(tmp_path / "build" / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
        expected = session.run(["logits"], {"image": images})[0]
        for binary in (False, True):
            served = infer_with_tritonclient(f"http://127.0.0.1:{port}", "digits-cnn", "image", images, "logits", binary)
            assert served.shape == (7, 10)
            np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    manifests = list(store.rglob("manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["modelName"] == "digits-cnn"

    # the same manifest again: a cache hit, no second artifact
    again = subprocess.run([sys.executable, "-m", "optimodel", "run", str(example_copy), "--store", str(store), "--build-only"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "cache hit" in again.stderr
    assert list(store.rglob("manifest.json")) == manifests


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimodel", *args], capture_output=True, text=True, cwd=cwd, timeout=180)


def test_run_rejects_invalid_manifest_with_field_path(tmp_path):
    doc = yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text())
    doc["spec"]["serving"]["maxBatchSize"] = -1
    doc["spec"]["model"]["uri"] = "ftp://models/digits.onnx"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = run_cli("run", str(bad), "--store", str(tmp_path / "store"))
    assert result.returncode == 1
    assert "spec.serving.maxBatchSize" in result.stderr
    assert "spec.model.uri" in result.stderr and "ftp" in result.stderr
    assert not (tmp_path / "store").exists()


def test_run_missing_model_fails_build_and_publishes_nothing(example_copy, tmp_path):
    (tmp_path / "build" / "digits_cnn.onnx").unlink()
    result = run_cli("run", str(example_copy), "--store", str(tmp_path / "store"), "--build-only")
    assert result.returncode == 1
    assert "FetchFailed" in result.stderr
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_run_corrupt_model_fails_with_invalid_model(example_copy, tmp_path):
    (tmp_path / "build" / "digits_cnn.onnx").write_bytes(b"this is not onnx")
    result = run_cli("run", str(example_copy), "--store", str(tmp_path / "store"), "--build-only")
    assert result.returncode == 1
    assert "InvalidModel" in result.stderr
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_run_checksum_mismatch(example_copy, tmp_path):
    doc = yaml.safe_load(example_copy.read_text())
    doc["spec"]["model"]["sha256"] = "0" * 64
    example_copy.write_text(yaml.safe_dump(doc))
    result = run_cli("run", str(example_copy), "--store", str(tmp_path / "store"), "--build-only")
    assert result.returncode == 1
    assert "ChecksumMismatch" in result.stderr
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_validate_cli_exit_codes(tmp_path):
    assert run_cli("validate", str(ROOT / "examples" / "digits-cnn.yaml")).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: optimodel.io/v1alpha1\nkind: OptimizedModel\nmetadata: {name: x}\nspec: {model: {uri: 'file:///m.onnx', inputs: [], colour: 1}}\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    assert "spec.model.colour: unknown field" in result.stderr
    assert "spec.model.inputs" in result.stderr
