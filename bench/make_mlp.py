"""The tuner bench's MLP: Linear(256,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10), FP32, dynamic batch.

Seeded weights (He-scaled normal), written straight as ONNX: nothing is downloaded.
    python bench/make_mlp.py [OUT.onnx]     (default bench/build/mlp.onnx)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = [(256, 1024), (1024, 1024), (1024, 10)]
DEFAULT = Path(__file__).resolve().parent / "build" / "mlp.onnx"


def make_mlp(path: Path = DEFAULT, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(LAYERS):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = np.zeros(fan_out, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = "logits" if i == len(LAYERS) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y if i == len(LAYERS) - 1 else f"g{i}"]))
        if i < len(LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [y]))
        x = y
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    print(make_mlp(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
