"""Multiply-accumulates per sample of an ONNX graph (Conv, ConvTranspose, Gemm, MatMul).

Counted from the graph so ONNX sources get the same figure as torch ones; these
ops are where dense compute lives, everything else is noise next to them.
"""

from __future__ import annotations

import math
from pathlib import Path


def onnx_macs(path: Path, seq_len: int = 8) -> int | None:
    """MACs for one sample (batch 1, dynamic non-batch axes at seq_len); None when shapes are unknown."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception:
        return None
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    def per_sample(shape: list[int]) -> int:
        # axis 0 is the batch; other unknown axes are taken as seq_len
        return math.prod(seq_len if d == -1 else d for d in shape[1:])

    total = 0
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose"):
            w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
            if not w or not out or not x:
                return None
            # weights are [Cout, Cin/group, k…] for Conv and [Cin, Cout/group, k…] for ConvTranspose
            if node.op_type == "Conv":
                total += per_sample(out) * w[1] * math.prod(w[2:])
            else:
                total += per_sample(x) * w[1] * math.prod(w[2:])
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if not a or not out:
                return None
            transposed = node.op_type == "Gemm" and any(t.name == "transA" and t.i for t in node.attribute)
            k = a[0] if transposed else a[-1]
            if k == -1:
                k = seq_len
            total += per_sample(out) * k
    return total
