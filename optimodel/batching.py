"""The batching config file the server reads and the operator (tuner) writes.

In a cluster it is a ConfigMap key mounted into the pod; kubelet swaps the whole
directory through a `..data` symlink, so readers re-read by path, never by inode.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Annotated

from pydantic import Field

from optimodel.spec import ApiModel

BATCHING_FILE = "batching.json"


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4 … up to max_batch_size, which is always included: the sizes the builder profiles
    and the server warms up, so that the tuner's profile covers every bucket the server runs."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes


class BatchingConfig(ApiModel):
    max_wait_ms: float = Field(ge=0, le=10_000)
    max_batch_size: int = Field(ge=1, le=4096)
    max_queue: int = Field(default=1024, ge=1)
    # the tuner's window per architecture (each serves its own engine); absent: maxWaitMs
    max_wait_ms_by_arch: dict[str, Annotated[float, Field(ge=0, le=10_000)]] = Field(default_factory=dict)

    def for_arch(self, arch: str) -> "BatchingConfig":
        """The config one architecture's pods run: its tuned window, without the per-arch table."""
        wait = self.max_wait_ms_by_arch.get(arch, self.max_wait_ms)
        return self.model_copy(update={"max_wait_ms": wait, "max_wait_ms_by_arch": {}})


def load_batching_config(path: Path) -> BatchingConfig:
    """Parse the file; raises ValueError / OSError with the reason when it is bad."""
    return BatchingConfig.model_validate(json.loads(Path(path).read_text()))


def dump_batching_config(config: BatchingConfig) -> str:
    data = config.wire()
    if not data.get("maxWaitMsByArch"):
        data.pop("maxWaitMsByArch", None)  # untuned configs keep their old, shorter form
    return json.dumps(data, sort_keys=True)


def write_batching_config(path: Path, config: BatchingConfig) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_batching_config(config))
    tmp.replace(path)
