"""`python -m builder_job` as `optimodel run` and the Job run it: exit codes, the last stdout line, --result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimodel import artifact
from optimodel.build import BuildResult

from .conftest import ROOT


def run_cli(request_file: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OPTIMODEL_PROFILE_SECONDS": "0.01", **(env or {})}
    return subprocess.run([sys.executable, "-m", "builder_job", "--request", str(request_file), *extra],
                          capture_output=True, text=True, cwd=ROOT, env=environ, timeout=300)


def last_result(proc: subprocess.CompletedProcess) -> BuildResult:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr: {proc.stderr[-2000:]}"
    return BuildResult.model_validate_json(lines[-1])


def write_request(path: Path, request) -> Path:
    path.write_text(json.dumps(request.wire()))
    return path


def test_build_then_cache_hit(make_request, tmp_path):
    request = make_request()
    request_file = write_request(tmp_path / "request.json", request)
    result_file = tmp_path / "out" / "result.json"
    result_file.parent.mkdir()
    termination = tmp_path / "termination-log"
    termination.touch()  # like kubelet's file: written only when it exists

    first = run_cli(request_file, "--result", str(result_file), env={"OPTIMODEL_TERMINATION_LOG": str(termination)})

    assert first.returncode == 0, first.stderr[-3000:]
    result = last_result(first)
    assert (result.state, result.reason, result.cache_key) == ("Succeeded", "Succeeded", request.cache_key)
    assert result_file.read_text().strip() == first.stdout.strip().splitlines()[-1]
    assert termination.read_text().strip() == first.stdout.strip().splitlines()[-1]
    artifact.verify_local(Path(result.artifact_uri.removeprefix("file://")))
    assert "compile done in" in first.stderr  # stage lines with durations go to stderr

    second = run_cli(request_file)
    assert second.returncode == 0, second.stderr[-3000:]
    assert last_result(second).reason == "CacheHit"


def test_failed_build_exits_1_with_the_reason(make_request, tmp_path, store):
    request = make_request(uri=f"file://{tmp_path}/missing.onnx")
    result_file = tmp_path / "result.json"
    missing_log = tmp_path / "no-such-dir" / "termination-log"

    proc = run_cli(write_request(tmp_path / "request.json", request), "--result", str(result_file),
                   env={"OPTIMODEL_TERMINATION_LOG": str(missing_log)})

    assert proc.returncode == 1
    result = last_result(proc)
    assert (result.state, result.reason) == ("Failed", "FetchFailed")
    assert json.loads(result_file.read_text())["reason"] == "FetchFailed"
    assert not missing_log.exists()
    assert not any(p.is_file() for p in store.rglob("*"))


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not JSON"]),
    (json.dumps({"modelName": "digits", "cacheKey": "abc"}), ["field 'source'", "field 'target'"]),
    (json.dumps({"modelName": "digits", "cacheKey": "abc", "maxBatchSize": 0, "artifactUri": "file:///x",
                 "target": {"arch": "cpu"},
                 "source": {"uri": "file:///m.onnx", "inputs": [{"name": "x", "dtype": "float99", "shape": [-1]}]}}),
     ["field 'source.inputs[0].dtype'", "field 'maxBatchSize'"]),
])
def test_invalid_request_exits_2_naming_file_and_field(tmp_path, content, words):
    request_file = tmp_path / "bad-request.json"
    request_file.write_text(content)

    proc = run_cli(request_file)

    assert proc.returncode == 2
    assert str(request_file) in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    result = last_result(proc)
    assert result.state == "Failed" and str(request_file) in result.message
    assert result.reason.value == "InvalidRequest"


def test_missing_request_file_exits_2(tmp_path):
    proc = run_cli(tmp_path / "absent.json")
    assert proc.returncode == 2
    assert "absent.json" in proc.stderr


def test_a_failure_every_retry_repeats_exits_3(make_request, tmp_path, digits_build):
    # the builder Job's podFailurePolicy fails the Job on 3 instead of retrying it
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes((digits_build / "digits_cnn.onnx").read_bytes()[:300])
    proc = run_cli(write_request(tmp_path / "request.json", make_request(uri=f"file://{corrupt}")))
    assert proc.returncode == 3
    assert last_result(proc).reason == "InvalidModel"
