"""Everything TensorRT: GPU detection, engine build from ONNX, and running an engine.

The only module that imports tensorrt, and only inside functions: the CPU image
and the tests on machines without NVIDIA's packages never load it. Written for
the TensorRT 10.x and 11.x Python API: a strongly typed network (the precision
is in the ONNX as QDQ / FP16 tensors, since TensorRT 11 has no FP16/INT8 builder
flags or calibrators), one optimization profile over batch 1..maxBatchSize, and a
timing cache that the caller keeps in the store per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimodel.build import BuildReason
from optimodel.spec import TensorSpec
from optimodel.target import Target

from builder_job.errors import BuildError
from builder_job.runtime import DEFAULT_DYNAMIC_DIM, Runner

WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class GpuInfo:
    major: int
    minor: int
    name: str  # as the driver says it, e.g. "NVIDIA H100 80GB HBM3"

    @property
    def arch(self) -> str:
        return f"sm{self.major}{self.minor}"

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def product(self) -> str:
        """Spelled like the GPU feature discovery label nvidia.com/gpu.product."""
        return "-".join(self.name.split())


@dataclass
class EngineBuild:
    plan: Path
    tensorrt_version: str
    timing_cache: bytes | None


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install failing to load libnvinfer
        raise BuildError(BuildReason.TENSORRT_BUILD_FAILED,
                         "TensorRT is not importable in this image "
                         f"({type(exc).__name__}: {exc}); GPU builds need the 'gpu' extra "
                         "(tensorrt>=10,<12) and an NVIDIA driver") from exc
    return trt


def detect_gpu() -> GpuInfo | None:
    """The first visible GPU, through torch when it has CUDA, else cuda-python; None without one."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(major, minor, torch.cuda.get_device_name(0))
    except Exception:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except Exception:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            return None
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(props.major, props.minor, name.rstrip("\x00"))
    except Exception:
        return None


def require_gpu(target: Target) -> GpuInfo:
    """The GPU a target's engine is built on; NoGPU when absent or of another architecture.

    A TensorRT plan only runs on the compute capability it was built on, so building
    for sm90 on an sm80 node would publish an engine no sm90 pod can load.
    """
    gpu = detect_gpu()
    if gpu is None:
        raise BuildError(BuildReason.NO_GPU,
                         f"target {target.arch} needs an NVIDIA GPU, and this machine has none visible "
                         "(no CUDA device through torch or cuda-python)")
    if gpu.arch != target.arch:
        raise BuildError(BuildReason.NO_GPU,
                         f"target {target.arch} but this node's GPU is {gpu.name} ({gpu.arch}); "
                         "the Job must run on a node of the target architecture")
    return gpu


def profile_shapes(spec: TensorSpec, max_batch_size: int, sample_shape: tuple[int, ...] | None):
    """(min, opt, max) shapes: batch 1..maxBatchSize, optimized for maxBatchSize.

    Dynamic non-batch axes (sequence length) span 1..the sample's length, since the
    spec has no bound for them.
    """
    lo, opt, hi = [1], [max_batch_size], [max_batch_size]
    for i, dim in enumerate(spec.shape[1:], start=1):
        if dim == -1:
            length = sample_shape[i] if sample_shape is not None else DEFAULT_DYNAMIC_DIM
            lo.append(1)
            opt.append(length)
            hi.append(length)
        else:
            lo.append(dim)
            opt.append(dim)
            hi.append(dim)
    return tuple(lo), tuple(opt), tuple(hi)


class _CapturingLogger:
    """Factory for a trt.ILogger that keeps errors for the failure message."""

    @staticmethod
    def create(trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)

        return Logger()


def build_engine(onnx_path: Path, plan_path: Path, inputs: list[TensorSpec], max_batch_size: int,
                 timing_cache: bytes | None = None, sample_shapes: dict[str, tuple[int, ...]] | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> EngineBuild:
    trt = import_tensorrt()
    logger = _CapturingLogger.create(trt)
    builder = trt.Builder(logger)
    # 10.x needs the flag for strong typing; 11.x keeps it only for compatibility
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(BuildReason.TENSORRT_BUILD_FAILED, f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)[:1500]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for spec in inputs:
        shapes = profile_shapes(spec, max_batch_size, (sample_shapes or {}).get(spec.name))
        profile.set_shape(spec.name, *shapes)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another TensorRT version or GPU: start over rather than fail
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(BuildReason.TENSORRT_BUILD_FAILED,
                         f"TensorRT engine build failed: {'; '.join(logger.errors)[-1500:] or 'no error logged'}")
    plan_path.write_bytes(bytes(serialized))
    return EngineBuild(plan=plan_path, tensorrt_version=trt.__version__, timing_cache=bytes(cache.serialize()))


def engine_runner(plan_path: Path) -> Runner:
    """A runner over the engine; buffers through torch CUDA tensors (the builder image has CUDA torch)."""
    trt = import_tensorrt()
    import torch

    logger = _CapturingLogger.create(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise BuildError(BuildReason.TENSORRT_BUILD_FAILED, f"cannot deserialize {plan_path.name}: {logger.errors}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    stream = torch.cuda.Stream()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        keep = []
        for name in input_names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name].astype(dtype, copy=False))).cuda()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in output_names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=_torch_dtype(torch, dtype), device="cuda")
            outputs.append(tensor)
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise BuildError(BuildReason.TENSORRT_BUILD_FAILED, "TensorRT execution failed")
        stream.synchronize()
        return [t.cpu().numpy() for t in outputs]

    return run


def _torch_dtype(torch, dtype: np.dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
            np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
            np.dtype(np.bool_): torch.bool}[dtype]
