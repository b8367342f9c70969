"""The compression stages on the real digits CNN: torch-pruning, distillation, ORT quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from builder_job.distill import distill
from builder_job.errors import BuildError
from builder_job.prune import prune_model
from builder_job.quantize import RECIPE_DYNAMIC, RECIPE_FP16_ON_CPU, quantize_onnx
from optimodel.build import BuildReason
from optimodel.target import CPU, Target

H100 = Target(arch="sm90", product="NVIDIA-H100-80GB-HBM3")


@pytest.fixture(scope="module")
def teacher(digits_build: Path) -> nn.Module:
    from examples.digits_cnn import build_model

    model = build_model()
    model.load_state_dict(torch.load(digits_build / "digits_cnn.pt", map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def example(digits_build: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(digits_build / "digits_test.npz")["image"][:2])


@pytest.fixture(scope="module")
def calib(digits_build: Path) -> dict[str, np.ndarray]:
    return {"image": np.load(digits_build / "digits_calib.npz")["image"][:64]}


def _agreement(a: nn.Module, b: nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return float((a(t).argmax(1) == b(t).argmax(1)).float().mean())


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


# ---- prune -------------------------------------------------------------------------

def test_prune_cuts_macs_at_ratio_and_keeps_the_interface(teacher, example):
    result = prune_model(teacher, (example,), ratio=0.5, method="l2", round_to=8)
    # halving both the input and output channels of inner convs cuts their MACs to a quarter
    assert result.macs_after <= 0.5 * result.macs_before
    assert result.params_after < result.params_before
    with torch.no_grad():
        assert result.model(example).shape == teacher(example).shape == (2, 10)
    # the caller's model is the distillation teacher: it must be untouched
    assert [c.out_channels for c in _convs(teacher)] == [64, 128, 128, 128, 128]


def test_prune_rounds_channels_and_never_prunes_the_classifier(teacher, example):
    result = prune_model(teacher, (example,), ratio=0.3, method="l1", round_to=8)
    widths = [c.out_channels for c in _convs(result.model)]
    assert all(w % 8 == 0 for w in widths), widths
    assert widths != [64, 128, 128, 128, 128]
    linear = [m for m in result.model.modules() if isinstance(m, nn.Linear)][-1]
    assert linear.out_features == 10


def test_taylor_pruning_ranks_channels_by_gradients_on_data(teacher, example, digits_build):
    images = torch.from_numpy(np.load(digits_build / "digits_calib.npz")["image"][:64])
    taylor = prune_model(teacher, (example,), ratio=0.3, method="taylor", round_to=8, data=(images,))
    l2 = prune_model(teacher, (example,), ratio=0.3, method="l2", round_to=8)
    assert taylor.macs_after < taylor.macs_before
    assert [c.out_channels for c in _convs(taylor.model)] == [c.out_channels for c in _convs(l2.model)]
    # same widths, other channels kept: the ranking came from the gradients, not the weight norms
    kept = [c.weight.detach() for c in _convs(taylor.model)][0]
    assert not torch.equal(kept, [c.weight.detach() for c in _convs(l2.model)][0])
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is left untouched


def test_prune_refuses_what_it_cannot_do(teacher, example):
    with pytest.raises(BuildError) as err:
        prune_model(teacher, (example,), ratio=0.5, method="taylor")  # no data for the gradients
    assert err.value.reason == BuildReason.PRUNING_UNSUPPORTED and "datasetUri" in err.value.message
    scripted = torch.jit.trace(teacher, example)
    with pytest.raises(BuildError) as err:
        prune_model(scripted, (example,), ratio=0.5)
    assert err.value.reason == BuildReason.PRUNING_UNSUPPORTED


# ---- distill -----------------------------------------------------------------------

def test_distill_brings_the_pruned_student_back_to_the_teacher(digits_build, teacher, example):
    train = dict(np.load(digits_build / "digits_train.npz"))
    test = np.load(digits_build / "digits_test.npz")["image"]
    student = prune_model(teacher, (example,), ratio=0.5).model
    before = _agreement(student, teacher, test)
    subset = {k: v[:512] for k, v in train.items()}
    messages: list[str] = []
    distill(student, teacher, subset, ["image"], epochs=3, temperature=4.0, alpha=0.7, log=messages.append)
    after = _agreement(student, teacher, test)
    assert after > before + 0.3 and after >= 0.9, (before, after)
    assert len(messages) == 3 and not student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distill_rejects_mismatched_data(teacher, example):
    data = {"image": np.zeros((8, 1, 8, 8), np.float32), "labels": np.zeros(5, np.int64)}
    with pytest.raises(BuildError) as err:
        distill(teacher, teacher, data, ["image"], epochs=1, temperature=2.0, alpha=0.5)
    assert err.value.reason == BuildReason.INVALID_DATASET and "labels" in err.value.message
    with pytest.raises(BuildError) as err:
        distill(teacher, teacher, {"pixels": data["image"]}, ["image"], epochs=1, temperature=2.0, alpha=0.5)
    assert err.value.reason == BuildReason.INVALID_DATASET and "image" in err.value.message


# ---- quantize ----------------------------------------------------------------------

def _ops(path: Path) -> dict[str, list]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, list] = {}
    for node in model.graph.node:
        out.setdefault(node.op_type, []).append((node, inits))
    return out


def _activation_zero_points(path: Path) -> list[np.ndarray]:
    """Zero points of QuantizeLinear nodes (activations: weights are stored pre-quantized)."""
    from onnx import numpy_helper

    zps = []
    for node, inits in _ops(path).get("QuantizeLinear", []):
        zps.append(numpy_helper.to_array(inits[node.input[2]]))
    return zps


def test_int8_on_cpu_is_qdq_with_u8_activations_and_keeps_accuracy(digits_build, calib, tmp_path):
    import onnxruntime as ort

    result = quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "int8.onnx", "int8", CPU, calib)
    assert result.precision == "int8" and "u8 asymmetric" in result.recipe and "per-channel" in result.recipe
    zps = _activation_zero_points(result.path)
    assert zps and all(z.dtype == np.uint8 for z in zps)
    ops = _ops(result.path)
    stored = [onnx.numpy_helper.to_array(inits[n.input[0]]) for n, inits in ops["DequantizeLinear"]
              if n.input[0] in inits]
    conv_weights = [w for w in stored if w.ndim == 4]
    assert len(conv_weights) == 5 and all(w.dtype == np.int8 for w in conv_weights)
    # per-channel: every conv weight has one scale per output channel
    scales = [onnx.numpy_helper.to_array(inits[n.input[1]]) for n, inits in ops["DequantizeLinear"]
              if n.input[0] in inits and onnx.numpy_helper.to_array(inits[n.input[0]]).ndim == 4]
    assert all(s.ndim == 1 and len(s) > 1 for s in scales)
    # the classifier head stays float so the logits are not on an 8-bit grid
    assert "kept in float" in result.recipe and "Gemm" in ops

    test = np.load(digits_build / "digits_test.npz")
    accs = []
    for path in (digits_build / "digits_cnn.onnx", result.path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        accs.append(float((sess.run(None, {"image": test["image"]})[0].argmax(1) == test["labels"]).mean()))
    assert accs[1] >= accs[0] - 0.01, accs


def test_int8_for_tensorrt_has_symmetric_s8_activations(digits_build, calib, tmp_path):
    result = quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "trt.onnx", "int8", H100, calib)
    zps = _activation_zero_points(result.path)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert "s8 symmetric" in result.recipe and "reduce_range" not in result.recipe


def test_int8_without_calibration(digits_build, tmp_path):
    # a conv net without calibration data: dynamic ConvInteger would be slower than FP32
    with pytest.raises(BuildError) as err:
        quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "x.onnx", "int8", CPU, None)
    assert err.value.reason == BuildReason.QUANTIZATION_FAILED

    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    src = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, (torch.zeros(1, 64),), str(src), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=18, dynamo=False)
    result = quantize_onnx(src, tmp_path / "mlp_int8.onnx", "int8", CPU, None)
    assert result.recipe == RECIPE_DYNAMIC
    ops = _ops(result.path)
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    with pytest.raises(BuildError) as err:  # TensorRT runs static QDQ only
        quantize_onnx(src, tmp_path / "mlp_trt.onnx", "int8", H100, None)
    assert err.value.reason == BuildReason.QUANTIZATION_FAILED


@pytest.mark.parametrize("bad, word", [
    ({"image": np.zeros((16, 1, 28, 28), np.float32)}, "shape"),
    ({"image": np.zeros((16, 8, 8), np.float32)}, "shape"),
    ({"image": np.zeros((16, 1, 8, 8), np.int64)}, "dtype"),
    ({"pixels": np.zeros((16, 1, 8, 8), np.float32)}, "lacks"),
])
def test_bad_calibration_data_is_invalid_dataset(digits_build, tmp_path, bad, word):
    with pytest.raises(BuildError) as err:
        quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "x.onnx", "int8", CPU, bad)
    assert err.value.reason == BuildReason.INVALID_DATASET
    assert "image" in err.value.message and word in err.value.message
    assert not (tmp_path / "x.onnx").exists()


def test_fp16_converts_for_gpu_and_is_recorded_as_fp32_on_cpu(digits_build, tmp_path):
    gpu = quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "fp16.onnx", "fp16", H100, None)
    model = onnx.load(str(gpu.path))
    assert gpu.precision == "fp16"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)

    cpu = quantize_onnx(digits_build / "digits_cnn.onnx", tmp_path / "cpu.onnx", "fp16", CPU, None)
    assert (cpu.precision, cpu.recipe) == ("fp32", RECIPE_FP16_ON_CPU)
    assert cpu.path.read_bytes() == (digits_build / "digits_cnn.onnx").read_bytes()
