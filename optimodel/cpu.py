"""How many CPUs this process may use: what sizes every thread pool (builder and server alike)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this container may use: the cgroup quota, else the affinity mask.

    os.cpu_count() is the node's core count; in a pod limited to 2 CPUs, a pool of 64
    threads is throttled into far worse latency (and p99) than 2 threads give.
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        available = min(available, max(1, math.ceil(quota)))
    return max(1, available)


def _cgroup_quota(root: Path) -> float | None:
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota = int(v1_quota.read_text().strip())
            return None if quota <= 0 else quota / int(v1_period.read_text().strip())
    except (OSError, ValueError):
        return None
    return None
