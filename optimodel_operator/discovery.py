"""GPU fleet discovery from NVIDIA GPU Feature Discovery node labels (pure).

A node counts when it is Ready, not cordoned, has allocatable `nvidia.com/gpu`
and carries `nvidia.com/gpu.compute.major/minor`. Engines are kept one per
architecture (status.engines is keyed by arch), so when several GPU products
share an architecture one product is shown in status: the lexicographically
smallest, so it does not flip as node counts change. The cache key, the builder
Job's node selector and the Deployment all name the architecture only: a TensorRT
engine serves every GPU of its compute capability, so key, engine and Deployment agree.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from optimodel.target import CPU, Target

LABEL_MAJOR = "nvidia.com/gpu.compute.major"
LABEL_MINOR = "nvidia.com/gpu.compute.minor"
LABEL_PRODUCT = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"

log = logging.getLogger(__name__)


def _quantity(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def is_schedulable(node: Mapping) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = [c for c in conditions if c.get("type") == "Ready"]
    return bool(ready) and ready[-1].get("status") == "True"


def node_target(node: Mapping) -> Target | None:
    """The build target a node offers, or None when it offers no usable GPU."""
    if not is_schedulable(node):
        return None
    if _quantity(((node.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, 0)) <= 0:
        return None
    labels = (node.get("metadata") or {}).get("labels") or {}
    try:
        major, minor = int(labels[LABEL_MAJOR]), int(labels[LABEL_MINOR])
    except (KeyError, ValueError):
        # GFD not (yet) run on this node: the family label alone is ambiguous (ampere is sm80 or sm86)
        log.debug("node %s has GPUs but no compute capability labels", node.get("metadata", {}).get("name"))
        return None
    try:
        return Target.from_compute_capability(major, minor, labels.get(LABEL_PRODUCT) or None)
    except ValueError:
        return None


def fleet(targets: Iterable[Target | None]) -> dict[str, Target]:
    """arch -> representative target, from per-node targets."""
    by_arch: dict[str, Target] = {}
    for t in targets:
        if t is None:
            continue
        current = by_arch.get(t.arch)
        if current is None or (t.product or "") < (current.product or ""):
            by_arch[t.arch] = t
    return dict(sorted(by_arch.items()))


def desired_targets(gpu_architectures: str | list[str], cpu: bool, available: Mapping[str, Target],
                    cpu_target: Target = CPU) -> tuple[dict[str, Target], list[str]]:
    """(targets to build and serve by arch, requested archs with no node in the fleet).

    'auto' takes every architecture present and falls back to the CPU when the
    cluster has no GPU; an explicit list takes only those it names.
    """
    missing: list[str] = []
    if gpu_architectures == "auto":
        chosen = dict(available)
        if not chosen:
            cpu = True
    else:
        chosen = {}
        for arch in gpu_architectures:
            if arch in available:
                chosen[arch] = available[arch]
            else:
                missing.append(arch)
    if cpu:
        chosen["cpu"] = cpu_target
    return chosen, missing
