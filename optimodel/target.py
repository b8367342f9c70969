"""A build target: a GPU architecture (with its product when known) or the CPU with its instruction-set class.

The CPU class is part of the target (and so of the cache key) because the INT8 recipe
depends on it: on CPUs with VNNI, ONNX Runtime's u8s8 kernels accumulate in int32 and
take 8-bit weights; without VNNI they multiply-add pairs into int16 and saturate, so
the engine uses 7-bit weights (`reduce_range`). A `vnni` engine served on a CPU without
VNNI loses accuracy; a `portable` engine is correct on every x86-64 CPU (0.93 instead
of 0.99 agreement on MobileNetV2, see builder_job/quantize.py). The builder must honour
the class it is asked for (builder_job checks its host), and the operator schedules a
`vnni` class only on nodes Node Feature Discovery labels with VNNI (CPU_CLASS_NODE_LABELS).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CpuClass = Literal["portable", "vnni"]
# Node Feature Discovery labels of a class; a node with any of them qualifies (value "true")
CPU_CLASS_NODE_LABELS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "vnni": ("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", "feature.node.kubernetes.io/cpu-cpuid.AVXVNNI"),
}


def host_cpu_class(cpuinfo: str | None = None) -> CpuClass:
    """The class of this machine's CPU: 'vnni' with AVX512_VNNI or AVX_VNNI, else 'portable'."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "portable"
    flags = set(cpuinfo.split())
    return "vnni" if {"avx512_vnni", "avx_vnni"} & flags else "portable"


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    arch: str = Field(pattern=r"^(cpu|sm[0-9]{2,3})$", description="'cpu' or sm<major><minor>, e.g. sm90")
    product: str | None = Field(default=None, description="GPU product (nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3")
    cpu_class: CpuClass | None = Field(
        default=None, alias="cpuClass",
        description="CPU targets: the instruction-set class the engine is built for; None: the build host's")

    @model_validator(mode="after")
    def _cpu_class_only_for_cpu(self) -> "Target":
        if self.cpu_class is not None and self.arch != "cpu":
            raise ValueError("cpuClass is only for the cpu target")
        return self

    def resolved(self) -> "Target":
        """This target with the CPU class filled in from the build host when unset."""
        if self.arch == "cpu" and self.cpu_class is None:
            return self.model_copy(update={"cpu_class": host_cpu_class()})
        return self

    @property
    def kind(self) -> Literal["cpu", "gpu"]:
        return "cpu" if self.arch == "cpu" else "gpu"

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        if self.kind == "cpu":
            return None
        digits = self.arch[2:]
        return int(digits[:-1]), int(digits[-1])

    @classmethod
    def from_compute_capability(cls, major: int, minor: int, product: str | None = None) -> "Target":
        return cls(arch=f"sm{major}{minor}", product=product)

    @property
    def slug(self) -> str:
        """DNS-label-safe name part, e.g. 'sm90' or 'sm90-h100-80gb-hbm3'."""
        if not self.product:
            return self.arch
        product = re.sub(r"[^a-z0-9]+", "-", self.product.lower()).strip("-")
        product = product.removeprefix("nvidia-")
        return f"{self.arch}-{product}"[:40].rstrip("-")


CPU = Target(arch="cpu")
