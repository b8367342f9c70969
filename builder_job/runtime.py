"""What several stages share: ONNX Runtime sessions, runners, example inputs.
(The dtype tables and the CPU quota are in optimodel, shared with the server.)

A *runner* is any callable from named input arrays to the list of output arrays;
the gate and the profiler only see runners, so the same code measures a torch
module, an ONNX Runtime session and a TensorRT engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from optimodel.cpu import cpu_quota
from optimodel.dtypes import NUMPY_DTYPES
from optimodel.spec import TensorSpec

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

# a stand-in length for dynamic non-batch axes (sequence length) when no data says better
DEFAULT_DYNAMIC_DIM = 8


def ort_session(path: Path, threads: int | None = None, level: str = "ORT_ENABLE_ALL",
                optimized_path: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads or cpu_quota()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Runner:
    names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, {n: feeds[n] for n in names})

    return run


def torch_runner(module, input_names: list[str]) -> Runner:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names))
        return [t.detach().cpu().numpy() for t in flatten_outputs(out)]

    return run


def flatten_outputs(out) -> list:
    """Model outputs as a flat list, whatever container the forward returned."""
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in flatten_outputs(item)]
    return [out]


def run_batched(runner: Runner, data: dict[str, np.ndarray], input_names: list[str],
                batch_size: int) -> list[np.ndarray]:
    """Run the whole dataset through `runner` in chunks; outputs concatenated on axis 0."""
    n = len(data[input_names[0]])
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        chunks.append(runner({k: data[k][start:start + batch_size] for k in input_names}))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def example_inputs(specs: list[TensorSpec], batch: int, data: dict[str, np.ndarray] | None = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `batch` samples: taken from data when given (tiled if short), else synthetic."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if data is not None and spec.name in data and len(data[spec.name]):
            arr = data[spec.name]
            reps = math.ceil(batch / len(arr))
            feeds[spec.name] = np.ascontiguousarray(np.concatenate([arr] * reps)[:batch]) if reps > 1 else arr[:batch].copy()
            continue
        shape = [batch] + [DEFAULT_DYNAMIC_DIM if d == -1 else d for d in spec.shape[1:]]
        dtype = NUMPY_DTYPES[spec.dtype]
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            # small non-negative ints are valid token ids / indices for most models
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
