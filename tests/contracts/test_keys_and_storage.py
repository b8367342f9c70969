"""Cache key, targets, storage URIs, build result and batching config contracts."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from optimodel import storage
from optimodel.batching import BatchingConfig, load_batching_config, write_batching_config
from optimodel.build import DETERMINISTIC_EXIT_CODES, BuildReason, BuildResult, exit_code_for
from optimodel.cache_key import (builder_toolchain, cache_key, canonical_options, model_digest, toolchain_mismatch,
                                 toolchain_versions)
from optimodel.spec import ModelSource, Optimization
from optimodel.target import CPU, Target, host_cpu_class

SOURCE = ModelSource.model_validate({"uri": "s3://b/m.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]})
TOOLS = {"onnxruntime": "1.20", "tensorrt": "10.7"}


def key(source=SOURCE, opt=Optimization(), mbs=32, target=Target(arch="sm90"), tools=TOOLS):
    return cache_key(model_digest(source), canonical_options(source, opt, mbs), target, tools)


def test_cache_key_is_stable_and_sensitive():
    base = key()
    assert base == key()
    assert len(base) == 32
    assert key(opt=Optimization(precision="int8")) != base
    assert key(mbs=64) != base
    assert key(target=Target(arch="sm80")) != base
    # engines, Jobs and Deployments are per architecture: two products of one arch share the engine
    assert key(target=Target(arch="sm90", product="NVIDIA-H200")) == base
    assert key(tools={**TOOLS, "tensorrt": "11.0"}) != base
    pinned = SOURCE.model_copy(update={"sha256": "a" * 64})
    assert key(source=pinned) != base


def test_cpu_class_and_builder_toolchain_change_the_key():
    portable, vnni = Target(arch="cpu", cpu_class="portable"), Target(arch="cpu", cpu_class="vnni")
    assert key(target=portable) != key(target=vnni)
    # unset: the build host's class, so a local run's key says which recipe it used
    assert key(target=CPU) == key(target=Target(arch="cpu", cpu_class=host_cpu_class()))
    assert key(tools=builder_toolchain("reg/builder:1", None)) != key(tools=builder_toolchain("reg/builder:2", None))
    pinned = "reg/builder@sha256:" + "c" * 64
    assert builder_toolchain(pinned, None) == {"builderImage": pinned}
    # declared versions stand for the image (a retag with the same toolchain keeps its engines)
    assert builder_toolchain("reg/builder:2", TOOLS) == TOOLS
    with pytest.raises(ValueError, match="cpuClass is only for the cpu target"):
        Target(arch="sm90", cpu_class="vnni")


def test_host_cpu_class_reads_the_vnni_flags():
    assert host_cpu_class("flags : fpu avx2 avx512f avx512_vnni") == "vnni"
    assert host_cpu_class("flags : fpu avx2 avx_vnni") == "vnni"
    assert host_cpu_class("flags : fpu avx2 fma") == "portable"


def test_toolchain_mismatch_names_each_package():
    installed = toolchain_versions(CPU)
    assert toolchain_mismatch({**installed, "builderImage": "x"}, CPU) == {}
    assert toolchain_mismatch({"onnx": "0.0.1"}, CPU) == {"onnx": ("0.0.1", installed["onnx"])}


def test_model_code_changes_the_key():
    source = SOURCE.model_copy(update={"format": "pytorch", "entrypoint": "m:f"})
    with_code = ModelSource.model_validate({**source.wire(), "code": {"uri": "s3://b/m.py"}})
    other = ModelSource.model_validate({**source.wire(), "code": {"uri": "s3://b/m.py", "sha256": "b" * 64}})
    assert len({key(source=source), key(source=with_code), key(source=other)}) == 3


def test_builder_exit_codes_tell_repeatable_failures():
    assert exit_code_for(BuildReason.SUCCEEDED) == exit_code_for(BuildReason.CACHE_HIT) == 0
    assert exit_code_for(BuildReason.INVALID_REQUEST) == 2
    for reason in (BuildReason.INVALID_MODEL, BuildReason.ACCURACY_GATE_FAILED, BuildReason.CHECKSUM_MISMATCH):
        assert exit_code_for(reason) == 3 and 3 in DETERMINISTIC_EXIT_CODES
    for reason in (BuildReason.FETCH_FAILED, BuildReason.PUBLISH_FAILED, BuildReason.BUILD_FAILED,
                   BuildReason.UNAUTHORIZED, BuildReason.NO_GPU):
        assert exit_code_for(reason) == 1 and 1 not in DETERMINISTIC_EXIT_CODES


def test_toolchain_dict_order_does_not_matter():
    assert key(tools={"tensorrt": "10.7", "onnxruntime": "1.20"}) == key()


def test_model_digest_prefers_declared_then_file(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"abc")
    assert model_digest(SOURCE) == "uri:s3://b/m.onnx"
    assert model_digest(SOURCE, f) == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    pinned = SOURCE.model_copy(update={"sha256": "c" * 64})
    assert model_digest(pinned, f) == "sha256:" + "c" * 64


def test_toolchain_versions_read_installed():
    versions = toolchain_versions(CPU)
    assert versions["onnxruntime"] != "absent"
    assert "tensorrt" in toolchain_versions(Target(arch="sm90"))


def test_target_properties():
    t = Target.from_compute_capability(9, 0, "NVIDIA-H100-80GB-HBM3")
    assert t.arch == "sm90" and t.kind == "gpu" and t.compute_capability == (9, 0)
    assert t.slug == "sm90-h100-80gb-hbm3"
    assert Target(arch="sm120").compute_capability == (12, 0)
    assert CPU.kind == "cpu" and CPU.slug == "cpu"
    with pytest.raises(ValueError):
        Target(arch="hopper")


def test_storage_resolves_relative_and_pvc(tmp_path, monkeypatch):
    _, path = storage.resolve("file://./m.onnx", tmp_path)
    assert path == str(tmp_path / "m.onnx")
    monkeypatch.setenv("OPTIMODEL_PVC_ROOT", str(tmp_path / "pvc"))
    assert storage.local_path("pvc://models/a/b.onnx") == tmp_path / "pvc" / "models" / "a" / "b.onnx"
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        storage.resolve("ftp://h/x")


def test_fetch_missing_file_is_fetch_failed(tmp_path):
    with pytest.raises(storage.StorageError) as info:
        storage.fetch(f"file://{tmp_path}/nope.onnx", tmp_path / "out")
    assert info.value.reason == "FetchFailed"


def test_http_store_is_read_only_and_fetches(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"weights")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        dest = storage.fetch(f"{base}/m.bin", tmp_path / "dl" / "m.bin")
        assert dest.read_bytes() == b"weights"
        with pytest.raises(storage.StorageError) as info:
            storage.fetch(f"{base}/missing.bin", tmp_path / "dl" / "x")
        assert info.value.reason == "FetchFailed"
        with pytest.raises(storage.StorageError) as info:
            storage.write_bytes_atomic(f"{base}/new.bin", b"x")
        assert info.value.reason == "ReadOnlyStore"
    finally:
        server.shutdown()


def test_build_result_line_fits_termination_message():
    result = BuildResult(state="Failed", reason=BuildReason.BUILD_FAILED, cache_key="k", message="x" * 10000)
    line = result.line()
    assert len(line) < 4096 and "\n" not in line
    assert BuildResult.model_validate_json(line).reason == BuildReason.BUILD_FAILED


def test_batching_config_round_trip_and_rejects_bad(tmp_path):
    path = tmp_path / "cfg" / "batching.json"
    write_batching_config(path, BatchingConfig(max_wait_ms=3.5, max_batch_size=16))
    assert '"maxWaitMs": 3.5' in path.read_text()
    assert load_batching_config(path).max_batch_size == 16
    path.write_text('{"maxWaitMs": -1, "maxBatchSize": 16}')
    with pytest.raises(ValueError):
        load_batching_config(path)
