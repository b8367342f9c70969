"""The build, stage by stage: one BuildRequest in, one BuildResult out, nothing published on failure.

    cache → preflight → fetch → load → [prune → distill] → export → quantize
          → compile → gate → profile → publish

The gate runs on the compiled engine, not on the ONNX before compilation: what
is gated is exactly what will be served (TensorRT tactics and ONNX Runtime's
fusions can move numbers too).
"""

from __future__ import annotations

import copy
import tempfile
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from optimodel import artifact
from optimodel.build import BuildReason, BuildRequest, BuildResult
from optimodel.cpu import cpu_quota
from optimodel.spec import Accuracy, TensorSpec

from builder_job import compile as compile_stage
from builder_job import export, fetch, gate, load, profile, publish
from builder_job.errors import BuildError
from optimodel.cache_key import toolchain_mismatch
from optimodel.target import host_cpu_class
from builder_job.load import LoadedModel
from builder_job.macs import onnx_macs
from builder_job.runtime import example_inputs, ort_runner, ort_session, torch_runner
from builder_job.stagelog import StageLog


@dataclass
class BuildOptions:
    profiling: profile.ProfileSettings = field(default_factory=profile.ProfileSettings)
    workdir: Path | None = None  # kept after the build when given (debugging); a temp dir otherwise


@dataclass
class _State:
    """What the stages hand each other."""

    work: Path
    out: Path
    model_file: Path | None = None
    loaded: LoadedModel | None = None
    original: Any = None  # torch module before pruning (the teacher and the gate's reference)
    student: Any = None
    datasets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fp32_onnx: Path | None = None
    final_onnx: Path | None = None
    precision: str = "fp32"
    recipe: str = "fp32"
    prune_info: dict | None = None
    compiled: compile_stage.Compiled | None = None
    engine_runner: Any = None
    reference_runner: Any = None
    accuracy: Accuracy | None = None
    latency: dict | None = None
    fidelity: dict | None = None
    outputs: list[TensorSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def planned_stages(request: BuildRequest) -> list[str]:
    opt = request.optimization
    stages = ["cache", "preflight", "fetch", "load"]
    if opt.pruning:
        stages.append("prune")
        if opt.pruning.distillation:
            stages.append("distill")
    if request.source.format != "onnx":
        stages.append("export")
    if opt.precision != "fp32":
        stages.append("quantize")
    stages.append("compile")
    if opt.accuracy_gate:
        stages.append("gate")
    return stages + ["profile", "publish"]


def run_build(request: BuildRequest, log: StageLog | None = None, options: BuildOptions | None = None) -> BuildResult:
    options = options or BuildOptions()
    log = log or StageLog(planned_stages(request))
    log.plan(planned_stages(request))
    state: _State | None = None
    try:
        with log.stage("cache"):
            hit = artifact.is_published(request.artifact_uri, request.base_dir)
        if hit:
            log.info(f"cache hit: {request.artifact_uri} is published and verified; nothing to build")
            return _result(request, "Succeeded", BuildReason.CACHE_HIT, log, artifact_uri=request.artifact_uri,
                           message="artifact already published under this cache key")
        with _workdir(options.workdir) as work:
            state = _State(work=work, out=work / "artifact")
            state.out.mkdir(parents=True, exist_ok=True)
            uri = _build(request, state, log, options)
        return _result(request, "Succeeded", BuildReason.SUCCEEDED, log, artifact_uri=uri,
                       accuracy=state.accuracy, message=_summary(state))
    except gate.GateFailed as exc:
        return _result(request, "Failed", exc.reason, log, message=exc.message, accuracy=exc.accuracy)
    except BuildError as exc:
        return _result(request, "Failed", exc.reason, log, message=exc.message)
    except Exception as exc:  # a bug or an unforeseen library error: still one clear result line
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        log.info(traceback.format_exc())
        return _result(request, "Failed", BuildReason.BUILD_FAILED, log, message=f"unexpected error: {tb}")
    finally:
        log.close()


def _build(request: BuildRequest, s: _State, log: StageLog, options: BuildOptions) -> str:
    opt = request.optimization
    with log.stage("preflight"):
        preflight(request)
    with log.stage("fetch"):
        s.model_file = fetch.fetch_model(request.source, s.work / "model", request.base_dir)
        code_dir = (fetch.fetch_code(request.source.code, s.work / "code", request.base_dir)
                    if request.source.code else None)
        files = {purpose: fetch.fetch_uri(uri, s.work / "data" / purpose, request.base_dir, what=f"{purpose} dataset")
                 for purpose, uri in dataset_uris(request).items()}
    with log.stage("load"):
        s.loaded = load.load_model(s.model_file, request.source, request.base_dir, code_dir)
        need_labels = bool(opt.accuracy_gate and opt.accuracy_gate.metric == "top1")
        for purpose, path in files.items():
            s.datasets[purpose] = gate.load_dataset(path, request.source.inputs, purpose,
                                                    need_labels=need_labels and purpose == "gate")
        s.original = s.loaded.module
        s.student = s.loaded.module
    if opt.pruning:
        with log.stage("prune"):
            prune_stage(request, s)
        if opt.pruning.distillation:
            with log.stage("distill"):
                distill_stage(request, s, log)
    if s.loaded.is_torch:
        with log.stage("export"):
            pruned = s.student is not s.original
            s.fp32_onnx = export.export_onnx(
                s.student, request.source.inputs, s.loaded.output_names, s.work / "fp32.onnx",
                exported_program=None if pruned else s.loaded.exported_program, data=_any_data(s))
    else:
        s.fp32_onnx = s.model_file
    s.outputs = _declared_outputs(request, s.fp32_onnx)
    s.final_onnx = s.fp32_onnx
    if opt.precision != "fp32":
        with log.stage("quantize"):
            quantize_stage(request, s)
    with log.stage("compile"):
        if request.target.kind == "gpu":
            s.compiled = compile_stage.compile_gpu(
                s.final_onnx, s.out, request.target, request.source.inputs, request.max_batch_size,
                publish.read_timing_cache(request), example_inputs(request.source.inputs, 1, _any_data(s)))
        else:
            s.compiled = compile_stage.compile_cpu(s.final_onnx, s.out)
        s.engine_runner = compile_stage.compiled_runner(s.out, s.compiled)
        feeds = example_inputs(request.source.inputs, min(16, request.max_batch_size), _any_data(s))
        s.reference_runner = reference_runner(request, s)
        s.fidelity = gate.fidelity(s.reference_runner, s.engine_runner, feeds)
    if opt.accuracy_gate:
        with log.stage("gate"):
            s.accuracy = gate.run_gate(opt.accuracy_gate, s.reference_runner, s.engine_runner,
                                       s.datasets["gate"], [t.name for t in request.source.inputs],
                                       batch_size=_gate_batch(request))
            log.info(f"gate {s.accuracy.metric}: original {s.accuracy.original:.4f}, "
                     f"optimized {s.accuracy.optimized:.4f}, drop {s.accuracy.drop:.4f} <= {opt.accuracy_gate.max_drop}")
    with log.stage("profile"):
        s.latency = profile.profile_latency(s.engine_runner, request.source.inputs, request.max_batch_size,
                                            data=_any_data(s), settings=options.profiling)
        largest = s.latency[str(request.max_batch_size)]
        log.info(f"batch {request.max_batch_size}: p50 {largest['p50Ms']:.2f} ms, p99 {largest['p99Ms']:.2f} ms")
    with log.stage("publish"):
        saved = publish.save_timing_cache(request, s.compiled.timing_cache)
        if saved:
            s.notes.append(f"timing cache: {saved}")
        # the report's own timings stop here; the result line carries the publish time too
        publish.write_report(s.out, build_report(request, s, log.timings))
        manifest = publish.make_manifest(request, s.compiled, s.precision, s.outputs)
        return publish.publish_artifact(s.out, manifest, request)


# ---- stages that need more than one call -------------------------------------------

def preflight(request: BuildRequest) -> None:
    """Refuse early what cannot succeed, before any download or compute."""
    opt = request.optimization
    check_toolchain_and_class(request)
    if opt.pruning and request.source.format not in load.TORCH_FORMATS:
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED,
                         f"pruning needs a PyTorch source (torchscript, torch-export or pytorch); "
                         f"this model is {request.source.format}")
    if request.target.kind == "gpu":
        from builder_job import tensorrt_engine

        tensorrt_engine.require_gpu(request.target)
        tensorrt_engine.import_tensorrt()
    if request.source.format in load.TORCH_FORMATS:
        # torch also sizes its pool by the host's cores; ONNX sources never import torch
        import torch

        torch.set_num_threads(cpu_quota())


def check_toolchain_and_class(request: BuildRequest) -> None:
    """Honour the cache key's promises (optimodel.cache_key): the toolchain it names is this
    image's, and a CPU class it names is this host's (a portable build runs anywhere)."""
    mismatch = toolchain_mismatch(request.toolchain, request.target)
    if mismatch:
        raise BuildError(BuildReason.TOOLCHAIN_MISMATCH, "the request's cache key names another toolchain: " + ", ".join(
            f"{d} {want} asked, {have} installed" for d, (want, have) in sorted(mismatch.items())))
    if request.target.cpu_class == "vnni" and host_cpu_class() != "vnni":
        raise BuildError(BuildReason.CPU_CLASS_MISMATCH,
                         "target cpuClass vnni, but this host's CPU has no AVX512_VNNI/AVX_VNNI: the accuracy "
                         "gate would measure another engine than the one served; schedule on a VNNI node")


def dataset_uris(request: BuildRequest) -> dict[str, str]:
    opt = request.optimization
    uris = {}
    if opt.accuracy_gate:
        uris["gate"] = opt.accuracy_gate.dataset_uri
    if opt.calibration and opt.precision == "int8":
        uris["calibration"] = opt.calibration.dataset_uri
    if opt.pruning and opt.pruning.distillation:
        uris["distillation"] = opt.pruning.distillation.dataset_uri
    return uris


def prune_stage(request: BuildRequest, s: _State) -> None:
    import torch

    from builder_job.prune import prune_model

    pruning = request.optimization.pruning
    if not isinstance(s.original, torch.nn.Module) or isinstance(s.original, torch.jit.ScriptModule):
        raise BuildError(BuildReason.PRUNING_UNSUPPORTED,
                         f"pruning needs an eager torch.nn.Module; a {request.source.format} model is "
                         f"{type(s.original).__name__} (use format pytorch with an entrypoint)")
    feeds = example_inputs(request.source.inputs, batch=1, data=_any_data(s))
    args = tuple(torch.from_numpy(feeds[t.name]) for t in request.source.inputs)
    # the unpruned model stays as it is: the teacher for distillation and the gate's reference
    student = copy.deepcopy(s.original)
    try:
        data = None
        if pruning.method == "taylor" and _any_data(s) is not None:
            batch = example_inputs(request.source.inputs, batch=64, data=_any_data(s))
            data = tuple(torch.from_numpy(batch[t.name]) for t in request.source.inputs)
        result = prune_model(student, args, ratio=pruning.ratio, method=pruning.method, round_to=8, data=data)
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(BuildReason.BUILD_FAILED, f"pruning failed: {type(exc).__name__}: {exc}"[:1500]) from exc
    s.student = result.model.eval()
    s.prune_info = {"ratio": pruning.ratio, "method": pruning.method,
                    "macsBefore": result.macs_before, "macsAfter": result.macs_after,
                    "paramsBefore": result.params_before, "paramsAfter": result.params_after}


def distill_stage(request: BuildRequest, s: _State, log: StageLog) -> None:
    from builder_job.distill import distill

    cfg = request.optimization.pruning.distillation
    try:
        s.student = distill(s.student, s.original, s.datasets["distillation"],
                            [t.name for t in request.source.inputs], epochs=cfg.epochs,
                            temperature=cfg.temperature, alpha=cfg.alpha, log=log.info).eval()
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(BuildReason.BUILD_FAILED, f"distillation failed: {type(exc).__name__}: {exc}"[:1500]) from exc
    if s.prune_info is not None:
        s.prune_info["distillation"] = {"epochs": cfg.epochs, "temperature": cfg.temperature, "alpha": cfg.alpha}


def quantize_stage(request: BuildRequest, s: _State) -> None:
    from builder_job.quantize import quantize_onnx

    opt = request.optimization
    try:
        result = quantize_onnx(s.fp32_onnx, s.work / f"{opt.precision}.onnx", opt.precision, request.target,
                               s.datasets.get("calibration"),
                               samples=opt.calibration.samples if opt.calibration else 256,
                               input_names=[t.name for t in request.source.inputs])
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(BuildReason.QUANTIZATION_FAILED,
                         f"{opt.precision} quantization failed: {type(exc).__name__}: {exc}"[:1500]) from exc
    s.final_onnx, s.precision, s.recipe = Path(result.path), result.precision, result.recipe


def reference_runner(request: BuildRequest, s: _State):
    """The original model, as the user gave it, for the gate."""
    if s.loaded.is_torch:
        return torch_runner(s.original, [t.name for t in request.source.inputs])
    return ort_runner(ort_session(s.model_file, threads=cpu_quota()))


# ---- helpers ---------------------------------------------------------------------

def _any_data(s: _State) -> dict[str, np.ndarray] | None:
    """Real samples for tracing and profiling when some dataset came with the request."""
    for purpose in ("calibration", "gate", "distillation"):
        if purpose in s.datasets:
            return s.datasets[purpose]
    return None


def _gate_batch(request: BuildRequest) -> int:
    # a TensorRT engine takes no batch beyond its profile; ONNX Runtime takes any
    if request.target.kind == "gpu":
        return min(gate.GATE_BATCH, request.max_batch_size)
    return gate.GATE_BATCH


def _declared_outputs(request: BuildRequest, onnx_path: Path) -> list[TensorSpec]:
    if request.source.outputs:
        return list(request.source.outputs)
    import onnx

    return load.onnx_io(onnx.load(str(onnx_path), load_external_data=False).graph.output)


class _workdir:
    def __init__(self, path: Path | None):
        self.path, self._tmp = path, None

    def __enter__(self) -> Path:
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        self._tmp = tempfile.TemporaryDirectory(prefix="optimodel-build-")
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def build_report(request: BuildRequest, s: _State, timings: dict[str, float]) -> dict:
    out = s.out
    engine_file = out / s.compiled.engine_file
    macs_before = s.prune_info["macsBefore"] if s.prune_info else None
    macs_after = s.prune_info["macsAfter"] if s.prune_info else None
    if macs_after is None:
        macs_before = macs_after = onnx_macs(s.fp32_onnx)
    gate_cfg = request.optimization.accuracy_gate
    return {
        "cacheKey": request.cache_key,
        "modelName": request.model_name,
        "namespace": request.namespace,
        "target": {"arch": request.target.arch, "product": s.compiled.product or request.target.product,
                   "computeCapability": s.compiled.compute_capability},
        "source": {"uri": request.source.uri, "format": request.source.format,
                   "bytes": s.model_file.stat().st_size},
        "precision": s.precision,
        "recipe": s.recipe,
        "optimization": request.optimization.wire(),
        "engine": {"file": s.compiled.engine_file, "format": s.compiled.format,
                   "sessionOptions": s.compiled.session_options},
        "accuracy": s.accuracy.wire() if s.accuracy else None,
        "gate": ({"metric": gate_cfg.metric, "maxDrop": gate_cfg.max_drop, "passed": True,
                  "samples": int(len(s.datasets["gate"][request.source.inputs[0].name]))} if gate_cfg else None),
        "fidelity": s.fidelity,
        "latency": s.latency,
        "maxBatchSize": request.max_batch_size,
        "threads": cpu_quota(),
        "sizes": {"sourceBytes": s.model_file.stat().st_size, "fp32OnnxBytes": s.fp32_onnx.stat().st_size,
                  "onnxBytes": s.final_onnx.stat().st_size, "engineBytes": engine_file.stat().st_size},
        "macs": {"original": macs_before, "optimized": macs_after},
        "pruning": s.prune_info,
        "timings": dict(timings),
        "notes": s.notes + s.compiled.notes,
        "createdAt": datetime.now(timezone.utc).isoformat(),
    }


def _summary(s: _State) -> str:
    parts = [f"{s.precision} ({s.recipe}) {s.compiled.format} engine"]
    if s.accuracy:
        parts.append(f"{s.accuracy.metric} {s.accuracy.optimized:.4f} (drop {s.accuracy.drop:.4f})")
    if s.latency:
        largest = s.latency[max(s.latency, key=int)]
        parts.append(f"p99 {largest['p99Ms']:.2f} ms at batch {max(s.latency, key=int)}")
    return ", ".join(parts)


def _result(request: BuildRequest, state: str, reason: BuildReason, log: StageLog, message: str = "",
            artifact_uri: str | None = None, accuracy: Accuracy | None = None) -> BuildResult:
    return BuildResult(state=state, reason=reason, cache_key=request.cache_key, message=message,
                       artifact_uri=artifact_uri, accuracy=accuracy, timings=dict(log.timings))
