"""Export stage: a torch model to ONNX with a dynamic batch axis, checked against the source."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from optimodel.build import BuildReason
from optimodel.spec import TensorSpec

from builder_job.errors import BuildError
from builder_job.runtime import example_inputs, ort_runner, ort_session, torch_runner

OPSET = 18  # TensorRT 10 and ONNX Runtime 1.20+ both take 18; the range the contract allows is 18-20
ATOL, RTOL = 1e-4, 1e-3


def export_onnx(module: Any, inputs: list[TensorSpec], output_names: list[str], dst: Path,
                exported_program: Any = None, data: dict[str, np.ndarray] | None = None,
                opset: int = OPSET) -> Path:
    """Write dst and check that ONNX Runtime reproduces the module's outputs at another batch size."""
    import torch

    names = [t.name for t in inputs]
    trace_feeds = example_inputs(inputs, batch=2, data=data)
    args = tuple(torch.from_numpy(trace_feeds[n]) for n in names)
    try:
        # the exporters print progress and warnings; the stage log says what matters
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exported_program is not None:
                # a .pt2 carries its own dynamic shapes; the dynamo exporter keeps them
                onnx_program = torch.onnx.export(exported_program, args, input_names=names,
                                                 output_names=output_names, opset_version=opset,
                                                 dynamo=True, verbose=False)
                onnx_program.save(str(dst))
            else:
                torch.onnx.export(module, args, str(dst), input_names=names, output_names=output_names,
                                  dynamic_axes=dynamic_axes(inputs, output_names), opset_version=opset,
                                  dynamo=False, do_constant_folding=True)
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(BuildReason.EXPORT_FAILED, f"ONNX export failed: {type(exc).__name__}: {exc}"[:1500]) from exc
    check_export(module, dst, inputs, data)
    return dst


def dynamic_axes(inputs: list[TensorSpec], output_names: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in inputs:
        axes[spec.name] = {i: ("batch" if i == 0 else f"{spec.name}_{i}") for i, d in enumerate(spec.shape) if d == -1 or i == 0}
    for name in output_names:
        axes[name] = {0: "batch"}
    return axes


def check_export(module: Any, onnx_path: Path, inputs: list[TensorSpec],
                 data: dict[str, np.ndarray] | None = None, batch: int = 3) -> float:
    """Largest output difference, relative to the output scale; ExportFailed when beyond tolerance.

    Batch 3 differs from the trace batch, so a batch axis frozen by the export fails here.
    """
    names = [t.name for t in inputs]
    feeds = example_inputs(inputs, batch=batch, data=data, seed=1)
    try:
        got = ort_runner(ort_session(onnx_path))(feeds)
    except Exception as exc:
        raise BuildError(BuildReason.EXPORT_FAILED,
                         f"the exported ONNX does not run at batch {batch}: {type(exc).__name__}: {exc}"[:1500]) from exc
    want = torch_runner(module, names)(feeds)
    if len(got) != len(want):
        raise BuildError(BuildReason.EXPORT_FAILED, f"the export has {len(got)} outputs, the model {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise BuildError(BuildReason.EXPORT_FAILED, f"output {i}: export shape {g.shape}, model shape {w.shape}")
        if w.dtype.kind == "f":
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            err = float(np.max(np.abs(g64 - w64))) if w.size else 0.0
            scale = float(np.max(np.abs(w64))) if w.size else 0.0
            if err > ATOL + RTOL * scale:
                raise BuildError(BuildReason.EXPORT_FAILED,
                                 f"output {i} of the export differs from the model by {err:.3g} (scale {scale:.3g})")
            worst = max(worst, err / (scale or 1.0))
        elif not np.array_equal(g, w):
            raise BuildError(BuildReason.EXPORT_FAILED, f"output {i} of the export differs from the model")
    return worst
