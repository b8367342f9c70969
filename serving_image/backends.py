"""Engine backends behind one small interface: ONNX Runtime here, TensorRT in tensorrt_backend.

A backend is called from one engine thread at a time (the batcher's), with a whole
batch already concatenated; it returns one array per output with the same batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from optimodel.artifact import Manifest
from optimodel.cpu import cpu_quota
from optimodel.dtypes import NUMPY_DTYPES
from optimodel.spec import TensorSpec

log = logging.getLogger("serving_image")

class Backend(Protocol):
    platform: str  # v2 model metadata "platform"
    arch: str
    max_batch_size: int
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def default_engine_threads(quota: int | None = None) -> int:
    """Engine threads when none are given: the CPU quota less one core for the event loop.

    The HTTP loop (parsing, encoding, the batcher) is one busy Python thread; an engine
    using every core fights it for them. Measured on 2 cores (bench/serving.py, README
    "Engine threads"): the MLP held about 1.8x the rate at the p99 SLO with 1 engine
    thread as with 2, the digits CNN likewise; so the loop keeps a core.
    """
    quota = cpu_quota() if quota is None else quota
    return max(1, quota - 1)


def dummy_inputs(specs: Sequence[TensorSpec], batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for t in specs:
        shape = [batch] + [d if d > 0 else 1 for d in t.shape[1:]]
        dtype = NUMPY_DTYPES[t.dtype]
        if t.dtype == "string":
            feeds[t.name] = np.full(shape, "warm-up", dtype=object)
        else:
            # ones rather than zeros: a mask of zeros can take degenerate paths (division by 0 in pooling)
            feeds[t.name] = np.ones(shape, dtype=dtype)
    return feeds


def warm_up(backend: Backend, sizes: Sequence[int]) -> list[float]:
    """Run every size once; returns seconds per size, the largest timed on a second (warm) run."""
    times = []
    for size in sizes:
        feeds = dummy_inputs(backend.inputs, size)
        backend.run(feeds)
        if size == sizes[-1]:  # the first run of a shape pays allocations; admission wants the steady time
            t0 = time.perf_counter()
            backend.run(feeds)
            times.append(time.perf_counter() - t0)
        else:
            times.append(0.0)
    return times


_GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL", "disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL", "enable_all": "ORT_ENABLE_ALL",
}


def ort_session_options(settings: dict, threads: int):
    """SessionOptions from the manifest's build-time settings plus the server's thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for key, value in settings.items():
        if key in ("graph_optimization_level", "graphOptimizationLevel"):
            name = str(value)
            name = _GRAPH_LEVELS.get(name.lower(), name.upper() if name.upper().startswith("ORT_") else name)
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name)
        elif key in ("execution_mode", "executionMode"):
            mode = str(value).upper()
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if "PARALLEL" in mode else ort.ExecutionMode.ORT_SEQUENTIAL
        elif key in ("intra_op_num_threads", "inter_op_num_threads"):
            continue  # the server decides threads from its own CPU quota
        elif "." in key:  # ORT session config entries, e.g. session.intra_op.allow_spinning
            so.add_session_config_entry(key, str(value).lower() if isinstance(value, bool) else str(value))
        else:
            log.warning("ignoring unknown session option %s=%r in the manifest", key, value)
    return so


class OrtBackend:
    """ONNX Runtime: CUDA execution provider when onnxruntime-gpu offers it, else CPU."""

    def __init__(self, model_path: Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.threads = threads or default_engine_threads()
        so = ort_session_options(manifest.engine.session_options, self.threads)
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self.platform = "onnxruntime_onnx"
        self.arch = manifest.arch
        self.max_batch_size = manifest.max_batch_size
        self.inputs = manifest.inputs
        self.outputs = manifest.outputs
        self._output_names = [t.name for t in manifest.outputs]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [t.name for t in manifest.inputs if t.name not in graph_inputs] + \
                  [t.name for t in manifest.outputs if t.name not in graph_outputs]
        if missing:
            raise ValueError(f"manifest tensors {missing} are not in the ONNX graph "
                             f"(inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self.session = None


def load_backend(local_dir: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    engine_path = local_dir / manifest.engine.file
    if manifest.engine.format == "tensorrt":
        from serving_image.tensorrt_backend import TensorRTBackend  # imports tensorrt lazily

        return TensorRTBackend(engine_path, manifest)
    return OrtBackend(engine_path, manifest, threads=threads)
