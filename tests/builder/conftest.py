"""Fixtures for builder tests: requests against the digits example, a throwaway store, fast profiling."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from optimodel.build import BuildRequest
from optimodel.spec import ModelSource, Optimization, TensorSpec
from optimodel.target import CPU, Target

from builder_job.pipeline import BuildOptions, run_build
from builder_job.profile import ProfileSettings
from builder_job.stagelog import StageLog

ROOT = Path(__file__).resolve().parents[2]
DIGITS_INPUT = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])

# a handful of timed runs per batch size: the tests check the report's shape, not the speed
FAST = BuildOptions(profiling=ProfileSettings(seconds_per_batch=0.01, min_iters=3, max_iters=20, warmup=1))


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def make_request(digits_build, store):
    """BuildRequest factory: the digits ONNX on CPU, fp32, batch up to 4, unless overridden."""

    def make(*, uri: str | None = None, fmt: str = "onnx", entrypoint: str | None = None,
             inputs: list[TensorSpec] | None = None, optimization: dict | None = None,
             target: Target = CPU, max_batch_size: int = 4, sha256: str | None = None,
             outputs: list[TensorSpec] | None = None, code: dict | None = None) -> BuildRequest:
        key = uuid.uuid4().hex[:16]
        source = ModelSource(uri=uri or f"file://{digits_build}/digits_cnn.onnx", format=fmt,
                             entrypoint=entrypoint, sha256=sha256, inputs=inputs or [DIGITS_INPUT],
                             outputs=outputs, code=code)
        return BuildRequest(model_name="digits", source=source,
                            optimization=Optimization.model_validate(optimization or {}), target=target,
                            max_batch_size=max_batch_size, cache_key=key,
                            artifact_uri=f"file://{store}/default/digits/{key}", base_dir=str(ROOT))

    return make


@pytest.fixture
def build():
    """Run a build quietly with fast profiling; returns the BuildResult."""

    def run(request: BuildRequest, options: BuildOptions = FAST):
        return run_build(request, log=StageLog(fancy=False), options=options)

    return run


def published_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()]
