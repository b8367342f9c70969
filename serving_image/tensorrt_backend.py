"""TensorRT backend: the one module that imports tensorrt and cuda.bindings.

Both imports happen inside TensorRTBackend.__init__, so a CPU image without them
imports serving_image fine. Written against TensorRT 10/11's name-based I/O API
(num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3) and the
cuda-python runtime bindings (what NVIDIA's current samples use).

Device buffers are allocated once at the optimization profile's maximum shapes;
each call copies the batch in, sets the real input shapes, runs on one stream,
copies the outputs out and synchronizes. Calls come from the batcher's single
engine thread, so one execution context and one stream suffice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from optimodel.artifact import Manifest

log = logging.getLogger("serving_image")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:  # older cuda-python layout
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def _check(result):
    """cuda-python returns (err, *values); raise on err, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err!r}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


class ShapeOutsideProfile(ValueError):
    pass


def check_profile(name: str, shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...]) -> None:
    """Refuse shapes the optimization profile does not cover, naming the axis (pure, unit-testable)."""
    if len(shape) != len(low):
        raise ShapeOutsideProfile(f"input '{name}': rank {len(shape)} but the engine expects rank {len(low)}")
    for axis, (d, lo, hi) in enumerate(zip(shape, low, high)):
        if not lo <= d <= hi:
            raise ShapeOutsideProfile(f"input '{name}': dimension {axis} is {d}, the engine's optimization "
                                      f"profile allows {lo}..{hi}")


class TensorRTBackend:
    platform = "tensorrt_plan"

    def __init__(self, engine_path: Path, manifest: Manifest, profile: int = 0):
        import tensorrt as trt

        self._trt = trt
        self._cudart = cudart = _cudart()
        self.arch = manifest.arch
        self.inputs = manifest.inputs
        self.outputs = manifest.outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built for another GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate())
        if profile:
            self.context.set_optimization_profile_async(profile, int(self._stream))

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = {t.name for t in manifest.inputs}
        want_out = {t.name for t in manifest.outputs}
        if want_in != set(self._input_names) or not want_out <= set(self._output_names):
            raise ValueError(f"engine tensors (inputs {self._input_names}, outputs {self._output_names}) do not "
                             f"match the manifest (inputs {sorted(want_in)}, outputs {sorted(want_out)})")
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for n in self._input_names:
            low, _opt, high = self.engine.get_tensor_profile_shape(n, profile)
            self._profile[n] = (tuple(low), tuple(high))
        profile_max = min(high[0] for _low, high in self._profile.values())
        self.max_batch_size = min(manifest.max_batch_size, profile_max)
        if manifest.max_batch_size > profile_max:
            log.warning("manifest maxBatchSize %d exceeds the engine profile's %d; serving at most %d",
                        manifest.max_batch_size, profile_max, profile_max)

        # buffers sized for the largest shapes the profile admits
        self._buffers: dict[str, int] = {}
        for n in self._input_names:
            self.context.set_input_shape(n, self._profile[n][1])
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ValueError(f"engine tensor '{n}' has a data-dependent shape {shape}; not supported")
            nbytes = max(1, int(np.prod(shape)) * self._dtypes[n].itemsize)
            self._buffers[n] = _check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(n, int(self._buffers[n]))
        log.info("TensorRT engine %s: inputs %s, profile %s", engine_path.name, self._input_names, self._profile)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must outlive the async copies
        for n in self._input_names:
            arr = np.ascontiguousarray(inputs[n], dtype=self._dtypes[n])
            low, high = self._profile[n]
            check_profile(n, arr.shape, low, high)
            if not self.context.set_input_shape(n, arr.shape):
                raise ShapeOutsideProfile(f"input '{n}': TensorRT refused shape {arr.shape}")
            _check(cudart.cudaMemcpyAsync(self._buffers[n], arr.ctypes.data, arr.nbytes, h2d, self._stream))
            keep.append(arr)
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        results = {}
        for n in self._output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[n], out.nbytes, d2h, self._stream))
            results[n] = out
        _check(cudart.cudaStreamSynchronize(self._stream))
        return {t.name: results[t.name] for t in self.outputs}

    def close(self) -> None:
        cudart = self._cudart
        for ptr in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self.context = None
        self.engine = None
