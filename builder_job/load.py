"""Load stage: open the fetched model in its format and check it against the declared inputs.

Formats: ONNX, TorchScript, torch.export (.pt2), and a PyTorch entrypoint
'module:callable' whose result gets the fetched state_dict.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimodel.build import BuildReason
from optimodel.dtypes import NUMPY_DTYPES, ONNX_ELEM_TYPES
from optimodel.spec import ModelSource, TensorSpec

from builder_job.errors import BuildError
from builder_job.runtime import example_inputs, flatten_outputs

TORCH_FORMATS = ("torchscript", "torch-export", "pytorch")


@dataclass
class LoadedModel:
    format: str
    path: Path
    inputs: list[TensorSpec]
    output_names: list[str]
    module: Any = None  # torch.nn.Module (or ScriptModule) for torch formats
    exported_program: Any = None  # torch.export.ExportedProgram for torch-export
    onnx_outputs: list[TensorSpec] | None = None  # as the ONNX graph declares them

    @property
    def is_torch(self) -> bool:
        return self.format in TORCH_FORMATS


def load_model(path: Path, source: ModelSource, base_dir: str | None, code_dir: Path | None = None) -> LoadedModel:
    """code_dir: the fetched spec.model.code; without it (local runs) the manifest's folder holds the code."""
    if source.format == "onnx":
        return _load_onnx(path, source)
    module, program = _load_torch(path, source, str(code_dir) if code_dir else base_dir)
    out_names = _check_torch_signature(module, source)
    return LoadedModel(format=source.format, path=path, inputs=list(source.inputs), output_names=out_names,
                       module=module, exported_program=program)


# ---- ONNX ---------------------------------------------------------------------

def _load_onnx(path: Path, source: ModelSource) -> LoadedModel:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise BuildError(BuildReason.INVALID_MODEL, f"{path.name} is not a valid ONNX model: {_short(exc)}") from exc
    graph_inputs = onnx_io(model.graph.input, exclude={i.name for i in model.graph.initializer})
    graph_outputs = onnx_io(model.graph.output)
    check_onnx_inputs(source.inputs, graph_inputs)
    if source.outputs:
        check_onnx_outputs(source.outputs, graph_outputs)
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the checker passes graphs ONNX Runtime cannot run (unknown ops)
        raise BuildError(BuildReason.INVALID_MODEL, f"ONNX Runtime cannot load {path.name}: {_short(exc)}") from exc
    return LoadedModel(format="onnx", path=path, inputs=list(source.inputs),
                       output_names=[o.name for o in graph_outputs], onnx_outputs=graph_outputs)


def onnx_io(values, exclude: set[str] = frozenset()) -> list[TensorSpec]:
    """TensorSpecs of graph inputs/outputs; symbolic or unknown dimensions become -1."""
    specs = []
    for value in values:
        if value.name in exclude:
            continue
        tensor = value.type.tensor_type
        dtype = ONNX_ELEM_TYPES.get(tensor.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        specs.append(TensorSpec.model_construct(name=value.name, dtype=dtype or f"onnx:{tensor.elem_type}",
                                                shape=dims or [-1]))
    return specs


def check_onnx_inputs(declared: list[TensorSpec], actual: list[TensorSpec]) -> None:
    by_name = {t.name: t for t in actual}
    if set(by_name) != {t.name for t in declared}:
        raise BuildError(BuildReason.INPUT_MISMATCH,
                         f"declared inputs {[t.name for t in declared]} but the model takes {sorted(by_name)}")
    for spec in declared:
        _check_tensor(spec, by_name[spec.name], "input")


def check_onnx_outputs(declared: list[TensorSpec], actual: list[TensorSpec]) -> None:
    by_name = {t.name: t for t in actual}
    if set(by_name) != {t.name for t in declared}:
        raise BuildError(BuildReason.OUTPUT_MISMATCH,
                         f"declared outputs {[t.name for t in declared]} but the model returns {sorted(by_name)}")
    for spec in declared:
        _check_tensor(spec, by_name[spec.name], "output")


def _check_tensor(spec: TensorSpec, actual: TensorSpec, kind: str) -> None:
    reason = BuildReason.INPUT_MISMATCH if kind == "input" else BuildReason.OUTPUT_MISMATCH
    if spec.dtype != actual.dtype:
        raise BuildError(reason,
                         f"{kind} '{spec.name}' declared {spec.dtype}, the model has {actual.dtype}")
    if len(spec.shape) != len(actual.shape) or not all(_dim_fits(d, a) for d, a in zip(spec.shape, actual.shape)):
        raise BuildError(reason,
                         f"{kind} '{spec.name}' declared shape {spec.shape}, the model has {actual.shape} (-1 = dynamic)")


def _dim_fits(declared: int, model: int) -> bool:
    # a fixed model axis cannot serve a declared dynamic one (a batch axis fixed at 1
    # cannot batch); a declared fixed size narrows a dynamic model axis, which is fine
    if model == -1:
        return True
    return declared == model


# ---- torch --------------------------------------------------------------------

def _load_torch(path: Path, source: ModelSource, code_dir: str | None):
    import torch

    try:
        if source.format == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
            return module.eval(), None
        if source.format == "torch-export":
            program = torch.export.load(str(path))
            return program.module(), program
    except Exception as exc:
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"{path.name} is not a loadable {source.format} model: {_short(exc)}") from exc
    module = build_entrypoint(source.entrypoint or "", code_dir)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BuildError(BuildReason.INVALID_MODEL, f"{path.name} is not a loadable state_dict: {_short(exc)}") from exc
    state = _unwrap_state_dict(state)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"{path.name} does not fit {source.entrypoint}: {_short(exc)}") from exc
    return module.eval(), None


def build_entrypoint(entrypoint: str, code_dir: str | None):
    from torch import nn

    module_name, _, attr = entrypoint.partition(":")
    # the fetched spec.model.code, or in a local run without it the manifest's folder
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
        module = factory()
    except ModuleNotFoundError as exc:
        where = f"in {code_dir}" if code_dir else "on the import path"
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"entrypoint {entrypoint}: no module {exc.name!r} {where}; spec.model.code delivers the "
                         f"model's code (a .py file or an archive): {_short(exc)}") from exc
    except Exception as exc:
        raise BuildError(BuildReason.INVALID_MODEL, f"entrypoint {entrypoint} failed: {_short(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"entrypoint {entrypoint} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _unwrap_state_dict(state):
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                return state[key]
        return state
    raise BuildError(BuildReason.INVALID_MODEL, f"expected a state_dict, got {type(state).__name__}")


def _positional_arity(module) -> int | None:
    """How many inputs forward takes, when it can be told (None: *args or unknown)."""
    try:
        schema = getattr(module.forward, "schema", None)
        if schema is not None:  # TorchScript
            return len(schema.arguments) - 1
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return sum(1 for p in params if p.default is inspect.Parameter.empty)


def _check_torch_signature(module, source: ModelSource) -> list[str]:
    """Run one forward on inputs shaped as declared; a torch model has no declared shapes to compare."""
    import torch

    arity = _positional_arity(module)
    if arity is not None and arity != len(source.inputs):
        raise BuildError(BuildReason.INPUT_MISMATCH,
                         f"declared {len(source.inputs)} inputs but the model's forward takes {arity}")
    feeds = example_inputs(source.inputs, batch=2)
    try:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(feeds[t.name]) for t in source.inputs))
    except Exception as exc:
        shapes = {t.name: t.shape for t in source.inputs}
        raise BuildError(BuildReason.INPUT_MISMATCH,
                         f"the model rejects inputs shaped as declared {shapes}: {_short(exc)}") from exc
    outputs = flatten_outputs(out)
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise BuildError(BuildReason.INVALID_MODEL, "the model's forward must return tensors")
    if source.outputs:
        if len(source.outputs) != len(outputs):
            raise BuildError(BuildReason.OUTPUT_MISMATCH,
                             f"declared {len(source.outputs)} outputs, the model returns {len(outputs)}")
        for spec, tensor in zip(source.outputs, outputs):
            if NUMPY_DTYPES[spec.dtype] != np.dtype(str(tensor.dtype).removeprefix("torch.")):
                raise BuildError(BuildReason.OUTPUT_MISMATCH,
                                 f"output '{spec.name}' declared {spec.dtype}, the model returns {tensor.dtype}")
        return [o.name for o in source.outputs]
    return ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " …"
