"""Precision lives inside the ONNX: QDQ INT8, dynamic INT8, or FP16, with a recipe per target.

TensorRT 10/11 builds a strongly typed network from the precision the ONNX carries (TRT 11
dropped the FP16/INT8 builder flags and calibrators), and ONNX Runtime CPU runs the same
QDQ graphs, so this one stage serves both. The target is part of the cache key, so the
GPU and CPU artifacts of one model may differ in recipe:

int8, calibration data given (static, QDQ via quant_pre_process + quantize_static):
  * weights: int8, symmetric, per output channel, everywhere.
  * GPU (TensorRT): activations int8 *symmetric* (QInt8 + ActivationSymmetric), the only
    activation quantization TensorRT accepts.
  * CPU (ONNX Runtime): activations *asymmetric uint8* (QUInt8). ORT CPU fuses
    DQ -> Conv/MatMul/Add/Clip -> Q into integer kernels only for u8 activations; with s8
    activations ReLU6/Clip, residual Adds and many Convs stay in float between QDQ pairs
    and the model runs slower than FP32 (measured in bench/builder.py).
  * calibration: 99.99th percentile (see `_calibration_method`); the classifier head that
    produces the graph output stays float (`_output_heads`); for the portable CPU class
    (no VNNI, optimodel.target) weights use 7 bits (`reduce_range`, see `_static`) except depthwise convs, whose
    integer kernel cannot saturate and keep 8 bits (`_depthwise_convs`); on CPU, the stem of
    a depthwise-separable network (the convs before its first pointwise conv) stays float
    (`_stem_convs`). The recipe string names all of it.
int8, no calibration data, MatMul-heavy graph (transformers): quantize_dynamic, per-channel
  int8 weights, activations quantized at run time (recipe "int8-dynamic"). CPU only:
  TensorRT cannot run DynamicQuantizeLinear/MatMulInteger, so a GPU target without
  calibration data is QUANTIZATION_FAILED, and so is a conv network without calibration
  data (ConvInteger is slower than FP32 on ORT CPU; it needs static calibration).
fp16, GPU target: convert_float_to_float16(keep_io_types=True), so clients keep sending
  float32 and the cast happens inside the engine.
fp16, CPU target: ORT's CPU provider has few fp16 kernels and inserts casts around the
  rest, which is slower than FP32, so the artifact stays FP32 and the recipe says so:
  "fp32 (fp16 not used on cpu)". Never silent: the recipe goes into the report.
fp32: the model is copied unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder_job.errors import BuildError
from optimodel.build import BuildReason
from optimodel.dtypes import ONNX_NUMPY
from optimodel.target import Target

PRECISIONS = ("fp32", "fp16", "int8")
RECIPE_FP16_ON_CPU = "fp32 (fp16 not used on cpu)"
RECIPE_DYNAMIC = "int8-dynamic"



@dataclass
class QuantizeResult:
    path: Path
    precision: str
    recipe: str


def _graph_inputs(model) -> dict[str, tuple[np.dtype, list[int | None]]]:
    initializers = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[inp.name] = (ONNX_NUMPY.get(tt.elem_type, np.dtype(np.float32)), dims)
    return out


def check_calibration(model, calibration: dict[str, np.ndarray], input_names: list[str] | None) -> dict[str, np.ndarray]:
    """Match the calibration arrays to the graph inputs: names, dtypes, static dims, sample count.

    Raises INVALID_DATASET naming the first offending input. Returns arrays keyed by graph
    input name (input_names, when given, maps calibration keys to graph inputs by position).
    """
    graph = _graph_inputs(model)
    names = list(graph)
    keys = list(input_names) if input_names else names
    if len(keys) != len(names):
        raise BuildError(BuildReason.INVALID_DATASET,
                         f"calibration input names {keys} do not match the model inputs {names}")
    arrays: dict[str, np.ndarray] = {}
    count = None
    for key, name in zip(keys, names):
        if key not in calibration:
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"calibration data lacks input {key!r}; it has {sorted(calibration)}")
        arr = np.asarray(calibration[key])
        dtype, dims = graph[name]
        if arr.dtype != dtype:
            if arr.dtype.kind == dtype.kind and np.can_cast(arr.dtype, dtype):  # e.g. int32 ids for int64
                arr = arr.astype(dtype)
            else:
                raise BuildError(BuildReason.INVALID_DATASET,
                                 f"calibration input {key!r} has dtype {arr.dtype}, the model wants {dtype}")
        if arr.ndim != len(dims) or any(d is not None and d > 0 and d != s for d, s in zip(dims[1:], arr.shape[1:])):
            want = ["batch"] + [d if d else "?" for d in dims[1:]]
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"calibration input {key!r} has shape {list(arr.shape)}, the model wants {want}")
        if count is None:
            count = len(arr)
        elif len(arr) != count:
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"calibration input {key!r} has {len(arr)} samples, {keys[0]!r} has {count}")
        arrays[name] = arr
    if not count:
        raise BuildError(BuildReason.INVALID_DATASET, "calibration data has no samples")
    return arrays


def _op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _matmul_heavy(model) -> bool:
    ops = _op_counts(model)
    return ops["MatMul"] + ops["Gemm"] > ops["Conv"]


class _Reader:
    """CalibrationDataReader over in-memory arrays, in batches (the graph has a dynamic batch axis)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int):
        n = len(next(iter(arrays.values())))
        self._batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # part of the CalibrationDataReader protocol; one pass is all we need
        pass


def _calibration_method():
    """Which calibrator, and its options.

    MinMax lets one outlier activation stretch a tensor's range: MobileNetV2's top-1
    agreement with FP32 on confident real-photo crops was 0.957 (QDQ simulated in float,
    i.e. without kernel effects), percentile 99.999 gave 0.969, 99.99 gave 0.988; Entropy
    gave the same as MinMax. bench/builder.py measures the integer result.
    """
    from onnxruntime.quantization import CalibrationMethod

    return CalibrationMethod.Percentile, {"CalibPercentile": 99.99}, "percentile-99.99"


def _output_heads(model) -> list[str]:
    """Gemm/MatMul nodes that produce a graph output (the classifier), kept in float.

    Quantizing the head puts the logits themselves on an 8-bit grid, which flips close
    top-1 decisions; the head is a tiny share of the compute (0.4 % of MobileNetV2's MACs).
    """
    outputs = {o.name for o in model.graph.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    heads = []
    for name in outputs:
        node = producers.get(name)
        # walk back through the cheap float tail (Reshape/Flatten/Identity) to the head
        while node is not None and node.op_type in ("Reshape", "Flatten", "Identity", "Squeeze"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ("Gemm", "MatMul") and node.name:
            heads.append(node.name)
    return heads


def _attr(node, name: str, default):
    from onnx.helper import get_attribute_value

    return next((get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _conv_shapes(model) -> dict[str, tuple[object, list[int]]]:
    """Conv node name -> (node, weight dims) for Convs whose weight is an initializer."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return {n.name: (n, dims[n.input[1]]) for n in model.graph.node
            if n.op_type == "Conv" and n.name and len(n.input) > 1 and n.input[1] in dims}


def _depthwise_convs(model) -> list[str]:
    """Depthwise convs: group == channels, one input and one output channel per group (weight [C, 1, kh, kw])."""
    return [name for name, (node, w) in _conv_shapes(model).items()
            if _attr(node, "group", 1) > 1 and len(w) == 4 and w[1] == 1 and w[0] == _attr(node, "group", 1)]


def _stem_convs(model) -> list[str]:
    """In a depthwise-separable network, the convs between the graph input and the first pointwise conv.

    MobileNet-style stems (a dense 3x3 conv on the 3-channel image, then a depthwise conv,
    both at the highest resolution) are the most quantization-sensitive part of the network:
    on MobileNetV2, keeping them in float raised top-1 agreement with FP32 on confident crops
    from 0.976 to 1.000 and cut the mean KL to FP32 from 0.139 to 0.081 (bench/builder.py,
    ORT CPU). Their input is the float image, so no Q/DQ pair is added in front of them.
    Networks without depthwise convs, or whose walk from the input reaches no pointwise conv
    within three convs, get nothing kept in float here.
    """
    convs = _conv_shapes(model)
    if not _depthwise_convs(model):
        return []
    initializers = {i.name for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [i.name for i in model.graph.input if i.name not in initializers]
    seen, stem, reached_pointwise = set(frontier), [], False
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in convs:
                w = convs[node.name][1]
                if _attr(node, "group", 1) == 1 and len(w) == 4 and w[2:] == [1, 1]:
                    reached_pointwise = True  # the first pointwise conv ends the stem
                    continue
                if node.name not in stem:
                    stem.append(node.name)
            elif node.op_type in ("Conv", "Gemm", "MatMul"):
                continue
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return stem if reached_pointwise and 0 < len(stem) <= 3 else []


def _static(pre: Path, dst: Path, arrays: dict[str, np.ndarray], target: Target, samples: int) -> str:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    arrays = {k: v[:samples] for k, v in arrays.items()}
    gpu = target.kind == "gpu"
    method, calib_options, method_name = _calibration_method()
    model = onnx.load(str(pre), load_external_data=False)
    stem = [] if gpu else _stem_convs(model)
    exclude = stem + _output_heads(model)
    depthwise = [n for n in _depthwise_convs(model) if n not in exclude]
    weight_of = {name: node.input[1] for name, (node, _) in _conv_shapes(model).items()}
    del model
    # Without VNNI, ORT's u8s8 kernels multiply-add pairs into int16 (vpmaddubsw) and
    # saturate with full-range int8 weights: MobileNetV2's agreement with FP32 fell from
    # 0.99 (float simulation) to 0.88. 7-bit weights cannot saturate (but cost precision:
    # 0.93). The target's CPU class (part of the cache key, optimodel.target) decides: a
    # portable engine uses 7 bits, a vnni one 8 and is served only on VNNI nodes.
    # Depthwise convs run on MLAS's depthwise kernel, which widens to int32 before it
    # accumulates: full 8-bit weights do not saturate there (integer result == float-simulated
    # result on MobileNetV2), so they keep 8 bits per channel (agreement 0.926 -> 0.976).
    reduce_range = not gpu and target.resolved().cpu_class != "vnni"
    overrides = {}
    if reduce_range:
        overrides = {weight_of[n]: [{"reduce_range": False, "axis": 0}] for n in depthwise}
    quantize_static(
        str(pre), str(dst), _Reader(arrays, batch=16),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QInt8 if gpu else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        nodes_to_exclude=exclude or None,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": gpu, **calib_options,
                       **({"TensorQuantOverrides": overrides} if overrides else {})},
    )
    n = len(next(iter(arrays.values())))
    if not reduce_range:
        weights = "s8 symmetric per-channel"
    elif overrides:
        weights = (f"s8 symmetric per-channel on the {len(overrides)} depthwise convs, s7 symmetric per-channel "
                   "elsewhere (reduce_range: portable CPU class)")
    else:
        weights = "s7 symmetric per-channel (reduce_range: portable CPU class)"
    acts = "s8 symmetric" if gpu else "u8 asymmetric"
    recipe = f"int8-static qdq, weights {weights}, activations {acts}, {method_name} calibration on {n} samples"
    if stem:
        recipe += f", stem kept in float: {', '.join(stem)}"
    heads = [n for n in exclude if n not in stem]
    if heads:
        recipe += f", kept in float: {', '.join(heads)}"
    return recipe


def quantize_onnx(
    src: Path,
    dst: Path,
    precision: str,
    target: Target,
    calibration: dict[str, np.ndarray] | None,
    samples: int = 256,
    input_names: list[str] | None = None,
) -> QuantizeResult:
    """Write `src` at `precision` for `target` to `dst`; the recipe says exactly what was done."""
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision not in PRECISIONS:
        raise BuildError(BuildReason.QUANTIZATION_FAILED, f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "fp32" or (precision == "fp16" and target.kind == "cpu"):
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return QuantizeResult(dst, "fp32", "fp32" if precision == "fp32" else RECIPE_FP16_ON_CPU)

    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise BuildError(BuildReason.QUANTIZATION_FAILED, f"cannot load {src.name}: {exc}") from exc

    if precision == "fp16":
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dst))
        except Exception as exc:
            raise BuildError(BuildReason.QUANTIZATION_FAILED, f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc
        return QuantizeResult(dst, "fp16", "fp16 (float16 weights and activations, float32 inputs/outputs)")

    # int8
    if calibration is None:
        if target.kind == "gpu":
            raise BuildError(BuildReason.QUANTIZATION_FAILED,
                             "int8 for a GPU target needs calibration data: TensorRT runs only static QDQ "
                             "(set optimization.calibration)")
        if not _matmul_heavy(model):
            raise BuildError(BuildReason.QUANTIZATION_FAILED,
                             "int8 without calibration data is only done for MatMul-heavy models (dynamic "
                             "quantization); this is a convolutional model: set optimization.calibration")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        except Exception as exc:
            raise BuildError(BuildReason.QUANTIZATION_FAILED, f"dynamic quantization failed: {type(exc).__name__}: {exc}") from exc
        return QuantizeResult(dst, "int8", RECIPE_DYNAMIC)

    arrays = check_calibration(model, calibration, input_names)
    del model
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="optimodel-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:
            raise BuildError(BuildReason.QUANTIZATION_FAILED, f"quant_pre_process failed: {type(exc).__name__}: {exc}") from exc
        try:
            recipe = _static(pre, dst, arrays, target, samples)
        except BuildError:
            raise
        except Exception as exc:
            raise BuildError(BuildReason.QUANTIZATION_FAILED, f"static quantization failed: {type(exc).__name__}: {exc}") from exc
    return QuantizeResult(dst, "int8", recipe)
