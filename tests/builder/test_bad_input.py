"""Every bad input fails with its own reason, and nothing lands in the store."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from optimodel.build import BuildReason
from optimodel.cache_key import file_sha256
from optimodel.spec import TensorSpec
from optimodel.target import Target

from builder_job import tensorrt_engine
from builder_job.export import export_onnx
from builder_job.errors import BuildError

from .conftest import published_files


def _assert_failed(result, reason: BuildReason, store: Path, *words: str) -> None:
    assert (result.state, result.reason) == ("Failed", reason), result.message
    for word in words:
        assert word in result.message, result.message
    assert published_files(store) == [], "a failed build must publish nothing"


def test_missing_model_file(make_request, build, store, tmp_path):
    result = build(make_request(uri=f"file://{tmp_path}/nowhere/model.onnx"))
    _assert_failed(result, BuildReason.FETCH_FAILED, store, "nowhere/model.onnx")


def test_store_refusing_access_is_unauthorized(make_request, build, store, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, rpath, lpath, **kwargs):
        raise PermissionError(13, "Permission denied", rpath)

    # the tests run as root, which reads any file mode; the store refuses in the fsspec layer instead
    monkeypatch.setattr(LocalFileSystem, "get_file", refuse)
    result = build(make_request())
    _assert_failed(result, BuildReason.UNAUTHORIZED, store, "digits_cnn.onnx")


def test_checksum_mismatch(make_request, build, store, digits_build):
    wrong = "0" * 64
    result = build(make_request(sha256=wrong))
    _assert_failed(result, BuildReason.CHECKSUM_MISMATCH, store, wrong, file_sha256(digits_build / "digits_cnn.onnx"))


def test_matching_checksum_passes(make_request, build, digits_build):
    result = build(make_request(sha256=file_sha256(digits_build / "digits_cnn.onnx")))
    assert result.reason == BuildReason.SUCCEEDED, result.message


def test_corrupt_onnx(make_request, build, store, tmp_path, digits_build):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes((digits_build / "digits_cnn.onnx").read_bytes()[:300] + b"\x00garbage" * 50)
    result = build(make_request(uri=f"file://{corrupt}"))
    _assert_failed(result, BuildReason.INVALID_MODEL, store, "corrupt.onnx")


def test_corrupt_state_dict(make_request, build, store, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bad)
    result = build(make_request(uri=f"file://{bad}", fmt="pytorch", entrypoint="examples.digits_cnn:build_model"))
    _assert_failed(result, BuildReason.INVALID_MODEL, store, "examples.digits_cnn:build_model")


@pytest.mark.parametrize("declared, words", [
    (TensorSpec(name="image", dtype="float32", shape=[-1, 1, 9, 9]), ["[-1, 1, 9, 9]", "[-1, 1, 8, 8]"]),
    (TensorSpec(name="image", dtype="float16", shape=[-1, 1, 8, 8]), ["float16", "float32"]),
    (TensorSpec(name="pixels", dtype="float32", shape=[-1, 1, 8, 8]), ["pixels", "image"]),
    (TensorSpec(name="image", dtype="float32", shape=[-1, 8, 8]), ["[-1, 8, 8]"]),
])
def test_declared_inputs_that_do_not_match_the_onnx(make_request, build, store, declared, words):
    result = build(make_request(inputs=[declared]))
    _assert_failed(result, BuildReason.INPUT_MISMATCH, store, *words)


def test_declared_outputs_that_do_not_match_the_onnx(make_request, build, store):
    result = build(make_request(outputs=[TensorSpec(name="probs", dtype="float32", shape=[-1, 10])]))
    _assert_failed(result, BuildReason.OUTPUT_MISMATCH, store, "probs", "logits")


def test_declared_inputs_the_torch_model_rejects(make_request, build, store, digits_build):
    declared = TensorSpec(name="image", dtype="float32", shape=[-1, 3, 8, 8])
    result = build(make_request(uri=f"file://{digits_build}/digits_cnn.pt", fmt="pytorch",
                                entrypoint="examples.digits_cnn:build_model", inputs=[declared]))
    _assert_failed(result, BuildReason.INPUT_MISMATCH, store, "[-1, 3, 8, 8]")


@pytest.mark.parametrize("arrays, words", [
    ({"image": np.zeros((10, 1, 9, 9), np.float32)}, ["[10, 1, 9, 9]"]),
    ({"image": np.zeros((10, 1, 8, 8), np.float64)}, ["float64"]),
    ({"pixels": np.zeros((10, 1, 8, 8), np.float32)}, ["image"]),
    ({"image": np.zeros((10, 1, 8, 8), np.float32), "labels": np.zeros((10,), np.float32)}, ["labels"]),
])
def test_gate_dataset_of_wrong_shape_or_dtype(make_request, build, store, tmp_path, arrays, words):
    np.savez(tmp_path / "gate.npz", **arrays)
    result = build(make_request(optimization={"accuracyGate": {"datasetUri": f"file://{tmp_path}/gate.npz"}}))
    _assert_failed(result, BuildReason.INVALID_DATASET, store, "gate.npz", *words)


def test_top1_gate_without_labels(make_request, build, store, tmp_path):
    np.savez(tmp_path / "gate.npz", image=np.zeros((10, 1, 8, 8), np.float32))
    result = build(make_request(optimization={"accuracyGate": {"datasetUri": f"file://{tmp_path}/gate.npz",
                                                               "metric": "top1"}}))
    _assert_failed(result, BuildReason.INVALID_DATASET, store, "labels")


def test_calibration_dataset_of_wrong_shape(make_request, build, store, tmp_path):
    np.savez(tmp_path / "calib.npz", image=np.zeros((10, 1, 4, 4), np.float32))
    result = build(make_request(optimization={"precision": "int8",
                                              "calibration": {"datasetUri": f"file://{tmp_path}/calib.npz"}}))
    _assert_failed(result, BuildReason.INVALID_DATASET, store, "calib.npz")


def test_pruning_an_onnx_model(make_request, build, store, monkeypatch):
    # the spec validator refuses this manifest; a hand-written request must be refused too
    from builder_job import fetch

    monkeypatch.setattr(fetch, "fetch_model", lambda *a, **k: pytest.fail("refused before fetching"))
    result = build(make_request(optimization={"pruning": {"ratio": 0.5}}))
    _assert_failed(result, BuildReason.PRUNING_UNSUPPORTED, store, "onnx")


def test_pruning_a_torchscript_model(make_request, build, store, digits_build):
    result = build(make_request(uri=f"file://{digits_build}/digits_cnn.torchscript", fmt="torchscript",
                                optimization={"pruning": {"ratio": 0.5}}))
    _assert_failed(result, BuildReason.PRUNING_UNSUPPORTED, store, "entrypoint")


def _perturbing_quantizer(scale: float):
    """A stand-in quantize_onnx that adds noise to every float weight: a lossy 'optimization'."""

    def quantize_onnx(src, dst, precision, target, calibration, samples=256, input_names=None):
        model = onnx.load(str(src))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.ndim > 1:
                noisy = arr + rng.standard_normal(arr.shape).astype(np.float32) * scale * float(np.std(arr))
                init.CopyFrom(numpy_helper.from_array(noisy, init.name))
        onnx.save(model, str(dst))
        return types.SimpleNamespace(path=Path(dst), precision=precision, recipe="test-noise")

    return quantize_onnx


def _use_quantizer(monkeypatch, quantize_onnx) -> None:
    # a stand-in module, so these tests do not depend on the real quantizer
    monkeypatch.setitem(sys.modules, "builder_job.quantize", types.SimpleNamespace(quantize_onnx=quantize_onnx))


def test_accuracy_gate_failure_reports_both_numbers(make_request, build, store, digits_build, monkeypatch):
    _use_quantizer(monkeypatch, _perturbing_quantizer(0.5))
    result = build(make_request(optimization={
        "precision": "fp16",
        "accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz", "metric": "cosine", "maxDrop": 0}}))

    _assert_failed(result, BuildReason.ACCURACY_GATE_FAILED, store, "maxDrop 0")
    acc = result.accuracy
    assert acc is not None and acc.metric == "cosine"
    assert acc.original == 1.0 and acc.optimized < 1.0 and acc.drop > 0
    assert f"{acc.original:.4f}" in result.message and f"{acc.optimized:.4f}" in result.message


def test_real_int8_fails_a_zero_tolerance_cosine_gate(make_request, build, store, digits_build):
    pytest.importorskip("builder_job.quantize")
    result = build(make_request(optimization={
        "precision": "int8",
        "calibration": {"datasetUri": f"file://{digits_build}/digits_calib.npz", "samples": 64},
        "accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz", "metric": "cosine", "maxDrop": 0}}))
    _assert_failed(result, BuildReason.ACCURACY_GATE_FAILED, store, "cosine")
    assert 0 < result.accuracy.drop < 0.5  # int8 moves the logits a little, not wildly


def test_quantizer_crash_is_quantization_failed(make_request, build, store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op Foo")

    _use_quantizer(monkeypatch, broken)
    result = build(make_request(optimization={"precision": "fp16"}))
    _assert_failed(result, BuildReason.QUANTIZATION_FAILED, store, "unsupported op Foo")


def test_gpu_target_without_gpu(make_request, build, store, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "detect_gpu", lambda: None)
    result = build(make_request(target=Target(arch="sm90")))
    _assert_failed(result, BuildReason.NO_GPU, store, "sm90")


def test_gpu_target_on_this_gpu_less_machine(make_request, build, store):
    if tensorrt_engine.detect_gpu() is not None:
        pytest.skip("this machine has a GPU")
    result = build(make_request(target=Target(arch="sm80")))
    _assert_failed(result, BuildReason.NO_GPU, store)


def test_gpu_of_another_architecture(make_request, build, store, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "detect_gpu", lambda: tensorrt_engine.GpuInfo(8, 0, "NVIDIA A100-SXM4-40GB"))
    result = build(make_request(target=Target(arch="sm90")))
    _assert_failed(result, BuildReason.NO_GPU, store, "sm80", "sm90")


def test_gpu_without_tensorrt(make_request, build, store, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "detect_gpu", lambda: tensorrt_engine.GpuInfo(9, 0, "NVIDIA H100 80GB HBM3"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    result = build(make_request(target=Target(arch="sm90")))
    _assert_failed(result, BuildReason.TENSORRT_BUILD_FAILED, store, "TensorRT is not importable")


def test_export_that_does_not_reproduce_the_model(tmp_path):
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1) * torch.rand(1)

    spec = TensorSpec(name="x", dtype="float32", shape=[-1, 4])
    with pytest.raises(BuildError) as info:
        export_onnx(Noisy(), [spec], ["y"], tmp_path / "noisy.onnx")
    assert info.value.reason == BuildReason.EXPORT_FAILED


def test_export_check_catches_a_frozen_batch_axis(tmp_path):
    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(int(x.shape[0]), 2, -1)  # int() freezes the trace batch size into the graph

    spec = TensorSpec(name="x", dtype="float32", shape=[-1, 4])
    with pytest.raises(BuildError) as info:
        export_onnx(FixedBatch(), [spec], ["y"], tmp_path / "fixed.onnx")
    assert info.value.reason == BuildReason.EXPORT_FAILED


def test_an_unexpected_error_is_one_clear_result(make_request, build, store, monkeypatch):
    from builder_job import compile as compile_stage

    def explode(*args, **kwargs):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(compile_stage, "compile_cpu", explode)
    result = build(make_request())
    _assert_failed(result, BuildReason.BUILD_FAILED, store, "ZeroDivisionError", "surprise")


def test_a_request_naming_another_toolchain_is_refused_before_any_work(make_request, build, store):
    request = make_request().model_copy(update={"toolchain": {"onnxruntime": "0.0.1", "builderImage": "reg/b:1"}})
    result = build(request)
    assert (result.state, result.reason) == ("Failed", BuildReason.TOOLCHAIN_MISMATCH)
    assert "onnxruntime 0.0.1 asked" in result.message
    assert not published_files(store)


def test_a_vnni_build_on_a_host_without_vnni_is_refused(make_request, build, store, monkeypatch):
    from builder_job import pipeline

    monkeypatch.setattr(pipeline, "host_cpu_class", lambda: "portable")
    result = build(make_request(target=Target(arch="cpu", cpu_class="vnni")))
    assert (result.state, result.reason) == ("Failed", BuildReason.CPU_CLASS_MISMATCH)
    assert "schedule on a VNNI node" in result.message
