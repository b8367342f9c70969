"""Datasets for calibration, distillation and the accuracy gate: one .npz file.

Arrays are named after the model's inputs (each with the batch axis first);
an optional `labels` array (int64, one per sample) enables the top1 metric and
hard-label distillation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = "labels"


class DatasetError(ValueError):
    pass


def load_npz(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable .npz dataset: {exc}") from exc
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise DatasetError(f"{path} lacks arrays for inputs {missing}; it has {sorted(arrays)}")
    sizes = {k: len(v) for k, v in arrays.items() if k in input_names or k == LABELS}
    if len(set(sizes.values())) > 1:
        raise DatasetError(f"{path}: arrays differ in sample count {sizes}")
    return {k: v for k, v in arrays.items() if k in input_names or k == LABELS}
