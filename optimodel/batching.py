"""The batching config file the server reads and the operator (tuner) writes.

In a cluster it is a ConfigMap key mounted into the pod; kubelet swaps the whole
directory through a `..data` symlink, so readers re-read by path, never by inode.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from optimodel.spec import ApiModel

BATCHING_FILE = "batching.json"


class BatchingConfig(ApiModel):
    max_wait_ms: float = Field(ge=0, le=10_000)
    max_batch_size: int = Field(ge=1, le=4096)
    max_queue: int = Field(default=1024, ge=1)


def load_batching_config(path: Path) -> BatchingConfig:
    """Parse the file; raises ValueError / OSError with the reason when it is bad."""
    return BatchingConfig.model_validate(json.loads(Path(path).read_text()))


def dump_batching_config(config: BatchingConfig) -> str:
    return json.dumps(config.wire(), sort_keys=True)


def write_batching_config(path: Path, config: BatchingConfig) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_batching_config(config))
    tmp.replace(path)
