"""Builds end to end on the digits CNN: real torch, ONNX export, ONNX Runtime, a real file store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from optimodel import artifact, storage
from optimodel.build import BuildReason
from optimodel.spec import TensorSpec

from builder_job import fetch as fetch_stage
from builder_job.load import build_entrypoint

from .conftest import ROOT


def _artifact_dir(result) -> Path:
    return storage.local_path(result.artifact_uri)


def _onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]


@pytest.fixture(scope="module")
def digits_test(digits_build):
    with np.load(digits_build / "digits_test.npz") as data:
        return data["image"], data["labels"]


def test_onnx_fp32_build_publishes_a_verified_artifact_equal_to_the_source(make_request, build, digits_build,
                                                                           digits_test):
    request = make_request(optimization={"accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz",
                                                           "metric": "top1"}})
    result = build(request)

    assert result.state == "Succeeded", result.message
    assert result.reason == BuildReason.SUCCEEDED
    local = _artifact_dir(result)
    manifest = artifact.verify_local(local)
    assert manifest.cache_key == request.cache_key
    assert manifest.engine.format == "onnx" and manifest.engine.precision == "fp32"
    assert manifest.engine.session_options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert [o.name for o in manifest.outputs] == ["logits"]
    assert {f.path for f in manifest.files} >= {manifest.engine.file, "model.onnx", "report.json"}
    # manifest.json is the commit point: written after everything it lists
    manifest_time = (local / artifact.MANIFEST).stat().st_mtime_ns
    assert all((local / f.path).stat().st_mtime_ns <= manifest_time for f in manifest.files)
    assert not [p for p in local.parent.iterdir() if p.name.endswith(".staging")]

    images, labels = digits_test
    want = _onnx_logits(digits_build / "digits_cnn.onnx", images)
    got = _onnx_logits(local / manifest.engine.file, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    report = json.loads((local / "report.json").read_text())
    expected_top1 = float(np.mean(want.argmax(1) == labels))
    assert report["accuracy"]["original"] == pytest.approx(expected_top1, abs=1e-6)
    assert report["accuracy"]["drop"] == pytest.approx(0.0, abs=1e-6)
    assert result.accuracy.original == report["accuracy"]["original"]
    assert sorted(report["latency"], key=int) == ["1", "2", "4"]
    for row in report["latency"].values():
        assert 0 < row["p50Ms"] <= row["p95Ms"] <= row["p99Ms"]
    assert report["sizes"]["engineBytes"] == (local / manifest.engine.file).stat().st_size
    assert report["macs"]["original"] > 0
    assert report["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    for stage in ("fetch", "load", "compile", "gate", "profile", "publish"):
        assert result.timings[stage] >= 0
    assert "export" not in result.timings  # an ONNX source is not re-exported


def test_pytorch_entrypoint_build_matches_the_torch_model(make_request, build, digits_build, digits_test):
    request = make_request(uri=f"file://{digits_build}/digits_cnn.pt", fmt="pytorch",
                           entrypoint="examples.digits_cnn:build_model",
                           outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
                           optimization={"accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz",
                                                          "metric": "top1-agreement"}})
    result = build(request)

    assert result.state == "Succeeded", result.message
    assert "export" in result.timings
    local = _artifact_dir(result)
    manifest = artifact.verify_local(local)
    assert [o.name for o in manifest.outputs] == ["logits"]
    model = build_entrypoint("examples.digits_cnn:build_model", str(ROOT))
    model.load_state_dict(torch.load(digits_build / "digits_cnn.pt", weights_only=True))
    images, _ = digits_test
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(_onnx_logits(local / manifest.engine.file, images), want, rtol=1e-3, atol=1e-4)
    assert result.accuracy.metric == "top1-agreement"
    assert result.accuracy.drop <= 0.005


def test_torchscript_build(make_request, build, digits_build, digits_test):
    request = make_request(uri=f"file://{digits_build}/digits_cnn.torchscript", fmt="torchscript")
    result = build(request)

    assert result.state == "Succeeded", result.message
    local = _artifact_dir(result)
    manifest = artifact.verify_local(local)
    images, _ = digits_test
    want = torch.jit.load(str(digits_build / "digits_cnn.torchscript"))(torch.from_numpy(images[:16])).detach().numpy()
    np.testing.assert_allclose(_onnx_logits(local / manifest.engine.file, images[:16]), want, rtol=1e-3, atol=1e-4)
    # without declared outputs the export names the single output itself
    assert len(manifest.outputs) == 1 and manifest.outputs[0].shape[0] == -1


def test_torch_export_pt2_build_keeps_a_dynamic_batch(make_request, build, digits_build, tmp_path, digits_test):
    model = build_entrypoint("examples.digits_cnn:build_model", str(ROOT))
    model.load_state_dict(torch.load(digits_build / "digits_cnn.pt", weights_only=True))
    model.eval()
    program = torch.export.export(model, (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(program, str(tmp_path / "digits.pt2"))

    result = build(make_request(uri=f"file://{tmp_path}/digits.pt2", fmt="torch-export", max_batch_size=8))

    assert result.state == "Succeeded", result.message
    local = _artifact_dir(result)
    manifest = artifact.verify_local(local)
    images, _ = digits_test
    with torch.no_grad():
        want = model(torch.from_numpy(images[:7])).numpy()
    np.testing.assert_allclose(_onnx_logits(local / manifest.engine.file, images[:7]), want, rtol=1e-3, atol=1e-4)
    report = json.loads((local / "report.json").read_text())
    assert sorted(report["latency"], key=int) == ["1", "2", "4", "8"]


def test_cache_hit_does_no_work(make_request, build, tmp_path, monkeypatch):
    request = make_request()
    work = tmp_path / "prior"
    work.mkdir()
    (work / "engine.onnx").write_bytes(b"engine from an earlier build")
    from optimodel.artifact import EngineInfo, Manifest

    artifact.publish(work, Manifest(cache_key=request.cache_key, model_name="digits", arch="cpu",
                                    engine=EngineInfo(file="engine.onnx", format="onnx", precision="fp32"),
                                    inputs=request.source.inputs, outputs=request.source.inputs,
                                    max_batch_size=4, versions={}, files=[]),
                     request.artifact_uri)

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cache hit must not fetch the model")

    monkeypatch.setattr(fetch_stage, "fetch_model", no_fetch)
    result = build(request)

    assert (result.state, result.reason) == ("Succeeded", BuildReason.CACHE_HIT)
    assert result.artifact_uri == request.artifact_uri
    assert set(result.timings) == {"cache"}


def test_damaged_artifact_is_rebuilt_not_reused(make_request, build):
    request = make_request()
    first = build(request)
    assert first.reason == BuildReason.SUCCEEDED
    local = _artifact_dir(first)
    engine = artifact.read_manifest(local).engine.file
    (local / engine).write_bytes(b"truncated")

    second = build(request)

    assert second.reason == BuildReason.SUCCEEDED, second.message
    artifact.verify_local(local)  # the rebuilt engine matches its manifest again
    assert "fetch" in second.timings


def test_prune_distill_int8_build_records_what_it_did(make_request, build, digits_build):
    """The stages wired together; how accurate pruning and INT8 are is test_compression's business."""
    pytest.importorskip("builder_job.quantize")
    request = make_request(
        uri=f"file://{digits_build}/digits_cnn.pt", fmt="pytorch", entrypoint="examples.digits_cnn:build_model",
        optimization={
            "precision": "int8",
            "pruning": {"ratio": 0.5, "distillation": {"datasetUri": f"file://{digits_build}/digits_train.npz",
                                                       "epochs": 1}},
            "calibration": {"datasetUri": f"file://{digits_build}/digits_calib.npz", "samples": 64},
            "accuracyGate": {"datasetUri": f"file://{digits_build}/digits_test.npz", "metric": "top1",
                             "maxDrop": 0.05},
        })
    result = build(request)

    assert result.state == "Succeeded", result.message
    assert list(result.timings) == ["cache", "preflight", "fetch", "load", "prune", "distill", "export",
                                    "quantize", "compile", "gate", "profile", "publish"]
    local = _artifact_dir(result)
    manifest = artifact.verify_local(local)
    assert manifest.engine.precision == "int8"
    report = json.loads((local / "report.json").read_text())
    assert report["recipe"].startswith("int8")
    assert report["macs"]["optimized"] < report["macs"]["original"]
    assert report["pruning"]["distillation"]["epochs"] == 1
    assert report["sizes"]["onnxBytes"] < report["sizes"]["fp32OnnxBytes"]
    assert report["accuracy"]["drop"] <= 0.05
