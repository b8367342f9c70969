"""Accuracy gate: the optimized engine against the original model on the gate dataset.

Metrics (the first model output is the one compared):
  top1            accuracy against `labels`; drop = original − optimized
  top1-agreement  share of samples where both pick the same class; drop = 1 − agreement
  cosine          mean cosine similarity of the outputs (embeddings); drop = 1 − mean cosine
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimodel.build import BuildReason
from optimodel.dataset import LABELS, DatasetError, load_npz
from optimodel.dtypes import NUMPY_DTYPES
from optimodel.spec import Accuracy, AccuracyGate, TensorSpec

from builder_job.errors import BuildError
from builder_job.runtime import Runner, run_batched

GATE_BATCH = 64


def load_dataset(path: Path, inputs: list[TensorSpec], purpose: str, need_labels: bool = False) -> dict[str, np.ndarray]:
    """The .npz at path, checked against the declared inputs (InvalidDataset when it does not fit)."""
    try:
        data = load_npz(path, [t.name for t in inputs])
    except DatasetError as exc:
        raise BuildError(BuildReason.INVALID_DATASET, f"{purpose} dataset: {exc}") from exc
    check_dataset(data, inputs, purpose, path.name)
    if need_labels and LABELS not in data:
        raise BuildError(BuildReason.INVALID_DATASET,
                         f"{purpose} dataset {path.name} has no '{LABELS}' array, which metric top1 needs")
    return data


def check_dataset(data: dict[str, np.ndarray], inputs: list[TensorSpec], purpose: str, name: str) -> None:
    for spec in inputs:
        arr = data[spec.name]
        if arr.dtype != NUMPY_DTYPES[spec.dtype]:
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"{purpose} dataset {name}: '{spec.name}' is {arr.dtype}, the input is declared {spec.dtype}")
        fits = arr.ndim == len(spec.shape) and all(d == -1 or d == a for d, a in zip(spec.shape[1:], arr.shape[1:]))
        if not fits:
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"{purpose} dataset {name}: '{spec.name}' has shape {list(arr.shape)}, "
                             f"the input is declared {spec.shape} (-1 = any)")
    if len(data[inputs[0].name]) == 0:
        raise BuildError(BuildReason.INVALID_DATASET, f"{purpose} dataset {name} has no samples")
    if LABELS in data:
        labels = data[LABELS]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"{purpose} dataset {name}: '{LABELS}' must be one integer per sample, "
                             f"got {labels.dtype} of shape {list(labels.shape)}")


def score(metric: str, original: np.ndarray, optimized: np.ndarray, labels: np.ndarray | None) -> tuple[float, float]:
    """(original's score, optimized's score) for the metric; higher is better."""
    if metric == "top1":
        if labels is None:
            raise BuildError(BuildReason.INVALID_DATASET, "metric top1 needs a 'labels' array in the gate dataset")
        return (float(np.mean(_classes(original) == labels)), float(np.mean(_classes(optimized) == labels)))
    if metric == "top1-agreement":
        return 1.0, float(np.mean(_classes(original) == _classes(optimized)))
    if metric == "cosine":
        a = original.reshape(len(original), -1).astype(np.float64)
        b = optimized.reshape(len(optimized), -1).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.maximum(denom, 1e-30), 1.0)
        return 1.0, float(np.mean(cos))
    raise BuildError(BuildReason.BUILD_FAILED, f"unknown gate metric {metric}")


def _classes(logits: np.ndarray) -> np.ndarray:
    if logits.ndim < 2:
        raise BuildError(BuildReason.INVALID_MODEL,
                         f"a class metric needs outputs shaped [batch, classes], got {list(logits.shape)}")
    return logits.reshape(len(logits), -1).argmax(axis=1)


def run_gate(gate: AccuracyGate, original: Runner, optimized: Runner, data: dict[str, np.ndarray],
             input_names: list[str], batch_size: int = GATE_BATCH) -> Accuracy:
    """Measure, and raise AccuracyGateFailed (with both numbers) when the drop exceeds maxDrop."""
    want = run_batched(original, data, input_names, batch_size)[0]
    got = run_batched(optimized, data, input_names, batch_size)[0]
    if want.shape != got.shape:
        raise BuildError(BuildReason.ACCURACY_GATE_FAILED,
                         f"the optimized model's output shape {list(got.shape)} differs from the original's {list(want.shape)}")
    before, after = score(gate.metric, want, got, data.get(LABELS))
    drop = max(0.0, before - after)
    accuracy = Accuracy(metric=gate.metric, original=round(before, 6), optimized=round(after, 6), drop=round(drop, 6))
    if drop > gate.max_drop:
        raise GateFailed(accuracy, gate.max_drop, len(want))
    return accuracy


def fidelity(reference: Runner, optimized: Runner, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """How closely the engine reproduces the original on a few samples, gate or no gate (for the report)."""
    want = reference(feeds)[0].astype(np.float64)
    got = optimized(feeds)[0].astype(np.float64)
    if want.shape != got.shape:
        return {"samples": len(want), "shapeMismatch": True}
    _, cosine = score("cosine", want, got, None)
    return {"samples": len(want), "cosine": round(cosine, 6),
            "maxAbsDiff": float(np.max(np.abs(want - got))) if want.size else 0.0}


class GateFailed(BuildError):
    """AccuracyGateFailed that keeps the measured numbers for the result and the report."""

    def __init__(self, accuracy: Accuracy, max_drop: float, samples: int):
        super().__init__(
            BuildReason.ACCURACY_GATE_FAILED,
            f"{accuracy.metric}: original {accuracy.original:.4f}, optimized {accuracy.optimized:.4f}, "
            f"drop {accuracy.drop:.4f} > maxDrop {max_drop} on {samples} samples")
        self.accuracy = accuracy
