"""Knowledge distillation: retrain a pruned student against the unpruned teacher.

Loss (Hinton et al. 2015): alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
plus (1 - alpha) * cross-entropy(student, labels) when the dataset has "labels". The T^2
keeps the soft-target gradients on the same scale as the hard-label ones whatever the
temperature. Without labels the soft loss alone is used (weighting it by alpha would
only rescale the learning rate).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from builder_job.errors import BuildError
from optimodel.build import BuildReason

LABELS = "labels"


def _tensors(data: dict[str, np.ndarray], input_names: list[str]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    missing = [n for n in input_names if n not in data]
    if missing:
        raise BuildError(BuildReason.INVALID_DATASET,
                         f"distillation dataset lacks input(s) {missing}; it has {sorted(data)}")
    arrays = [np.asarray(data[n]) for n in input_names]
    n = len(arrays[0]) if arrays and arrays[0].ndim else 0
    if n == 0:
        raise BuildError(BuildReason.INVALID_DATASET, f"distillation input {input_names[0]!r} is empty")
    for name, arr in zip(input_names, arrays):
        if arr.ndim == 0 or len(arr) != n:
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"distillation input {name!r} has {len(arr) if arr.ndim else 0} samples, expected {n}")
        if arr.dtype.kind not in "fiub":
            raise BuildError(BuildReason.INVALID_DATASET, f"distillation input {name!r} has dtype {arr.dtype}")
    inputs = [torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a) for a in arrays]
    labels = None
    if LABELS in data:
        lab = np.asarray(data[LABELS])
        if lab.ndim != 1 or len(lab) != n or lab.dtype.kind not in "iu":
            raise BuildError(BuildReason.INVALID_DATASET,
                             f"distillation 'labels' must be {n} integers, got shape {lab.shape} dtype {lab.dtype}")
        labels = torch.from_numpy(lab.astype(np.int64))
    return inputs, labels


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: dict[str, np.ndarray],
    input_names: list[str],
    epochs: int,
    temperature: float,
    alpha: float,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Train `student` in place towards `teacher`'s outputs on `data`; returns it in eval mode.

    The teacher is frozen and kept in eval mode (its BatchNorm statistics never move). The
    outputs are treated as logits over their last axis. AdamW with a one-cycle schedule:
    a pruned network starts close to a good solution, so a short warm-up then annealing
    recovers accuracy in few epochs without wrecking the surviving weights.
    """
    if epochs < 1:
        raise BuildError(BuildReason.INVALID_DATASET, f"distillation needs at least one epoch, got {epochs}")
    inputs, labels = _tensors(data, input_names)
    n = len(inputs[0])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)

    steps_per_epoch = math.ceil(n / batch_size)
    lr = 2e-3
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    t2 = temperature * temperature
    kl = nn.KLDivLoss(reduction="batchmean", log_target=True)
    for epoch in range(epochs):
        start, total, seen = time.perf_counter(), 0.0, 0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2 and n > 1:  # BatchNorm cannot train on a single sample
                continue
            batch = [x[idx] for x in inputs]
            with torch.no_grad():
                t_logits = teacher(*batch)
            s_logits = student(*batch)
            soft = kl(torch.log_softmax(s_logits / temperature, dim=-1),
                      torch.log_softmax(t_logits / temperature, dim=-1)) * t2
            if labels is not None:
                loss = alpha * soft + (1 - alpha) * nn.functional.cross_entropy(s_logits, labels[idx])
            else:
                loss = soft
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        log(f"distill epoch {epoch + 1}/{epochs}: loss {total / max(seen, 1):.4f} "
            f"({time.perf_counter() - start:.1f}s)")
    student.eval()
    return student
