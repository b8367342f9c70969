"""The issue-11 MLP, Linear(256,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10), FP32, seeded.

Written straight as ONNX (MatMul/Add/Relu) with torch.nn.Linear's default initialisation
(uniform in +-1/sqrt(fan_in)) from a fixed seed: no torch export, the same bytes every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS = [(256, 1024), (1024, 1024), (1024, 10)]


def make_mlp_onnx(path: Path, seed: int = 0, hidden: int = 1024) -> Path:
    """hidden != 1024: the same shape, wider (an engine-bound variant for the overload figure)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    layers = [(256, hidden), (hidden, hidden), (hidden, 10)]
    for i, (fan_in, fan_out) in enumerate(layers):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}" if i < len(layers) - 1 else "y"])]
        prev = f"a{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
