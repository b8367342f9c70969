"""Compile stage: the engine for the target, written into the artifact directory.

CPU: the quantized (or FP32) ONNX is kept as model.onnx, the portable file any
ONNX Runtime can load; engine.onnx is the same graph after ONNX Runtime's offline
EXTENDED optimizations (fusions, QDQ folded into integer kernels). EXTENDED, not
ALL: ALL adds layout transforms tied to the build machine's instruction set,
which a pod on another node type could not use. The server applies ALL online.

GPU: a TensorRT plan (see tensorrt_engine); model.onnx is kept beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimodel.build import BuildReason
from optimodel.cpu import cpu_quota
from optimodel.spec import TensorSpec
from optimodel.target import Target

from builder_job.errors import BuildError
from builder_job.runtime import Runner, ort_runner, ort_session

PORTABLE_ONNX = "model.onnx"
CPU_ENGINE = "engine.onnx"
GPU_ENGINE = "model.plan"

# what the server should set on its SessionOptions; threads it decides from its own CPU quota
CPU_SESSION_OPTIONS: dict[str, str | int | bool] = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "execution_mode": "ORT_SEQUENTIAL",
    "inter_op_num_threads": 1,
}


@dataclass
class Compiled:
    engine_file: str  # relative to the artifact directory
    format: str  # "onnx" | "tensorrt"
    session_options: dict[str, str | int | bool] = field(default_factory=dict)
    compute_capability: str | None = None
    product: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timing_cache: bytes | None = None
    notes: list[str] = field(default_factory=list)


def compile_cpu(onnx_path: Path, out_dir: Path) -> Compiled:
    shutil.copyfile(onnx_path, out_dir / PORTABLE_ONNX)
    engine = out_dir / CPU_ENGINE
    try:
        ort_session(out_dir / PORTABLE_ONNX, threads=cpu_quota(), level="ORT_ENABLE_EXTENDED", optimized_path=engine)
    except Exception as exc:
        raise BuildError(BuildReason.BUILD_FAILED,
                         f"ONNX Runtime cannot optimize the model: {type(exc).__name__}: {exc}"[:1500]) from exc
    options = dict(CPU_SESSION_OPTIONS)
    if not engine.is_file():
        # ORT cannot save models past 2 GB in one file; serve the portable graph, optimized online
        return Compiled(engine_file=PORTABLE_ONNX, format="onnx", session_options=options,
                        notes=["offline optimization wrote no file; engine is the unoptimized ONNX"])
    return Compiled(engine_file=CPU_ENGINE, format="onnx", session_options=options,
                    notes=["engine.onnx was optimized offline at ORT_ENABLE_EXTENDED (portable across CPUs)"])


def compile_gpu(onnx_path: Path, out_dir: Path, target: Target, inputs: list[TensorSpec], max_batch_size: int,
                timing_cache: bytes | None, sample: dict[str, np.ndarray] | None) -> Compiled:
    from builder_job import tensorrt_engine

    gpu = tensorrt_engine.require_gpu(target)
    shutil.copyfile(onnx_path, out_dir / PORTABLE_ONNX)
    shapes = {k: tuple(v.shape) for k, v in (sample or {}).items()}
    built = tensorrt_engine.build_engine(out_dir / PORTABLE_ONNX, out_dir / GPU_ENGINE, inputs, max_batch_size,
                                         timing_cache=timing_cache, sample_shapes=shapes)
    return Compiled(engine_file=GPU_ENGINE, format="tensorrt", compute_capability=gpu.compute_capability,
                    product=gpu.product, versions={"tensorrt": built.tensorrt_version},
                    timing_cache=built.timing_cache)


def compiled_runner(out_dir: Path, compiled: Compiled) -> Runner:
    """A runner over the engine exactly as it will be served."""
    if compiled.format == "tensorrt":
        from builder_job import tensorrt_engine

        return tensorrt_engine.engine_runner(out_dir / compiled.engine_file)
    return ort_runner(ort_session(out_dir / compiled.engine_file, threads=cpu_quota()))
