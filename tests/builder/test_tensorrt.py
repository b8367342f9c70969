"""The TensorRT path on a real GPU.

Marked `gpu`: skipped on machines without an NVIDIA GPU, and skipped where the
`tensorrt` package is not importable. The machine these tests were written on
has neither, so they have NOT run there; they run where a GPU with TensorRT
10.x/11.x is present (`pytest -m gpu tests/builder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimodel import artifact, storage
from optimodel.build import BuildReason
from optimodel.target import Target

from builder_job import tensorrt_engine
from builder_job.errors import BuildError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("tensorrt")
    info = tensorrt_engine.detect_gpu()
    if info is None:
        pytest.skip("no CUDA device visible")
    return info


def test_fp32_engine_matches_onnxruntime_and_keeps_the_timing_cache(gpu, make_request, build, digits_build, store):
    request = make_request(target=Target(arch=gpu.arch), max_batch_size=16, optimization={
        "accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz", "metric": "top1", "maxDrop": 0.005}})
    request = request.model_copy(update={"timing_cache_uri": f"file://{store}/timing/{gpu.arch}.cache"})

    result = build(request)

    assert result.state == "Succeeded", result.message
    local = storage.local_path(result.artifact_uri)
    manifest = artifact.verify_local(local)
    assert manifest.engine.format == "tensorrt"
    assert manifest.compute_capability == gpu.compute_capability
    assert manifest.product == gpu.product
    assert manifest.versions["tensorrt"]
    cache_file = store / "timing" / f"{gpu.arch}.cache"
    assert cache_file.stat().st_size > 0

    with np.load(digits_build / "digits_test.npz") as data:
        images = data["image"][:16]
    run = tensorrt_engine.engine_runner(local / manifest.engine.file)
    want = ort.InferenceSession(str(digits_build / "digits_cnn.onnx")).run(None, {"image": images})[0]
    for batch in (1, 7, 16):
        got = run({"image": images[:batch]})[0]
        np.testing.assert_allclose(got, want[:batch], rtol=1e-2, atol=1e-2)
    report = json.loads((local / "report.json").read_text())
    assert sorted(report["latency"], key=int) == ["1", "2", "4", "8", "16"]

    # the next build of this arch starts from the stored cache and grows it
    again = build(make_request(target=Target(arch=gpu.arch), max_batch_size=8).model_copy(
        update={"timing_cache_uri": request.timing_cache_uri}))
    assert again.state == "Succeeded", again.message
    assert cache_file.stat().st_size > 0


def test_fp16_engine_passes_the_gate(gpu, make_request, build, digits_build):
    result = build(make_request(target=Target(arch=gpu.arch), max_batch_size=8, optimization={
        "precision": "fp16",
        "accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz", "metric": "top1", "maxDrop": 0.01}}))
    assert result.state == "Succeeded", result.message
    manifest = artifact.verify_local(storage.local_path(result.artifact_uri))
    assert manifest.engine.precision == "fp16"


def test_unparsable_onnx_is_a_tensorrt_build_failure(gpu, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BuildError) as info:
        tensorrt_engine.build_engine(bad, tmp_path / "bad.plan", [], max_batch_size=4)
    assert info.value.reason == BuildReason.TENSORRT_BUILD_FAILED
    assert not Path(tmp_path / "bad.plan").exists()
