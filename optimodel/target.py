"""A build target: a GPU architecture (with its product when known) or the CPU."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = Field(pattern=r"^(cpu|sm[0-9]{2,3})$", description="'cpu' or sm<major><minor>, e.g. sm90")
    product: str | None = Field(default=None, description="GPU product (nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3")

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
