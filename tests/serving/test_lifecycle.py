"""`python -m serving_image` as a process: refusing bad artifacts, config defaults, SIGTERM drain."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from optimodel.batching import BatchingConfig, write_batching_config

from .conftest import MODEL, ROOT_DIR, free_port, sample, start_server_process, wait_ready


_start = start_server_process


def test_tampered_artifact_is_refused(digits_artifact, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(digits_artifact, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = subprocess.run([sys.executable, "-m", "serving_image", "--artifact", str(bad), "--config",
                        str(tmp_path / "none.json")], cwd=ROOT_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "refusing to start: ChecksumMismatch" in r.stderr and "model.onnx" in r.stderr
    (bad / "manifest.json").unlink()
    r = subprocess.run([sys.executable, "-m", "serving_image", "--artifact", bad.as_uri(), "--config",
                        str(tmp_path / "none.json")], cwd=ROOT_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing to start: ManifestMissing" in r.stderr


def test_sigterm_answers_every_accepted_request_then_exits(digits_artifact, digits_images, reference, tmp_path):
    config = tmp_path / "batching.json"
    # a long window: the requests are still queued when SIGTERM arrives and when the listener closes
    write_batching_config(config, BatchingConfig(max_wait_ms=2500, max_batch_size=32))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(digits_artifact, config, port, "--drain-seconds", "1.0")
    try:
        wait_ready(url, proc=proc)

        def one(i: int):
            x = digits_images[i:i + 1]
            body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]})
            return x, httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, timeout=30)

        with cf.ThreadPoolExecutor(16) as pool:
            futs = [pool.submit(one, i) for i in range(16)]
            # all 16 are in the batcher's window before SIGTERM (a fixed sleep was flaky on a loaded box)
            deadline = time.monotonic() + 20
            while sample(httpx.get(f"{url}/metrics").text, "optimodel_inflight_requests") < 16:
                assert time.monotonic() < deadline, "the requests never reached the server"
                time.sleep(0.02)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            ready = httpx.get(f"{url}/v2/health/ready", timeout=5).status_code
            assert time.monotonic() - t_term < 1.0, "readiness was checked inside the drain window"
            answers = [f.result() for f in futs]
        assert ready == 503, "not ready once SIGTERM arrived"
        for x, r in answers:
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10),
                                       reference(x), rtol=1e-5, atol=1e-5)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert f"serving {MODEL} on http://127.0.0.1:{port}" in log
    assert "SIGTERM" in log


def test_absent_config_uses_manifest_defaults(digits_artifact, tmp_path):
    port = free_port()
    proc = _start(digits_artifact, tmp_path / "missing.json", port, "--model-name", "renamed")
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/renamed").json()
        assert meta["parameters"]["max_batch_size"] == 32 and meta["parameters"]["max_wait_ms"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "missing.json is absent; using maxBatchSize 32 (manifest) and maxWaitMs 2" in log
    assert "serving renamed on" in log


def test_engine_that_does_not_load_is_refused(tmp_path):
    from optimodel.artifact import EngineInfo, Manifest, publish
    from optimodel.spec import TensorSpec

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"not an onnx model")  # checksums fine, engine broken
    manifest = Manifest(cache_key="x" * 64, model_name="broken", arch="cpu",
                        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
                        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])],
                        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
                        max_batch_size=4, versions={}, files=[])
    publish(src, manifest, (tmp_path / "store" / "broken").as_uri())
    r = subprocess.run([sys.executable, "-m", "serving_image", "--artifact", str(tmp_path / "store" / "broken"),
                        "--config", str(tmp_path / "none.json")], cwd=ROOT_DIR, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "refusing to start: engine model.onnx does not load" in r.stderr


def test_failed_warm_up_exits_non_zero(digits_build, tmp_path):
    """The manifest promises a shape the engine rejects: warm-up fails, the process exits 4."""
    from optimodel.artifact import EngineInfo, Manifest, publish
    from optimodel.spec import TensorSpec

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(digits_build / "digits_cnn.onnx", src / "model.onnx")
    manifest = Manifest(cache_key="y" * 64, model_name="wrong", arch="cpu",
                        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
                        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 9])],
                        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
                        max_batch_size=4, versions={}, files=[])
    publish(src, manifest, (tmp_path / "store" / "wrong").as_uri())
    r = subprocess.run([sys.executable, "-m", "serving_image", "--artifact", str(tmp_path / "store" / "wrong"),
                        "--config", str(tmp_path / "none.json"), "--port", str(free_port()), "--threads", "1"],
                       cwd=ROOT_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "refusing to serve: warm-up failed" in r.stderr
