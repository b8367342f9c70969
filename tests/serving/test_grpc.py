"""gRPC (inference.GRPCInferenceService) through tritonclient[grpc], unchanged, beside REST and ONNX Runtime."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from optimodel.batching import BatchingConfig

from .conftest import MODEL, app_server, free_port, sample


@pytest.fixture(scope="module")
def server(digits_artifact):
    with app_server(digits_artifact, BatchingConfig(max_wait_ms=20, max_batch_size=32), grpc=True) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


def test_health_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert client.get_server_metadata(as_json=True)["name"] == "optimodel"
    with grpc.insecure_channel(server.grpc) as channel:
        probe = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_infer_matches_rest_and_onnxruntime(server, client, digits_images, reference):
    x = digits_images[:5]
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("logits")], request_id="r1")
    got = result.as_numpy("logits")
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r1"
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    rest = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body).json()
    np.testing.assert_array_equal(got.ravel(), np.array(rest["outputs"][0]["data"], np.float32))


def test_grpc_and_rest_requests_share_the_batcher(server, digits_images, reference):
    before = sample(httpx.get(f"{server.url}/metrics").text, "optimodel_request_latency_seconds_count")
    results = []

    def done(result, error):
        results.append((result, error))

    c = grpcclient.InferenceServerClient(server.grpc)
    for i in range(8):
        inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(digits_images[i:i + 1])
        c.async_infer(MODEL, [inp], done)
    import time
    deadline = time.monotonic() + 30
    while len(results) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close()
    assert len(results) == 8 and all(e is None for _, e in results), [e for _, e in results]
    outs = sorted(r.as_numpy("logits").tobytes() for r, _ in results)
    want = sorted(reference(digits_images[i:i + 1]).tobytes() for i in range(8))
    assert outs == want
    after = sample(httpx.get(f"{server.url}/metrics").text, "optimodel_request_latency_seconds_count")
    assert after - before == 8, "gRPC requests are counted in the same latency histogram"


@pytest.mark.parametrize("model,version,shape,code", [
    ("other", "", [1, 1, 8, 8], "StatusCode.NOT_FOUND"),
    (MODEL, "999", [1, 1, 8, 8], "StatusCode.NOT_FOUND"),
    (MODEL, "", [1, 1, 8, 9], "StatusCode.INVALID_ARGUMENT"),
    (MODEL, "", [33, 1, 8, 8], "StatusCode.INVALID_ARGUMENT"),
])
def test_bad_requests_get_grpc_status(client, model, version, shape, code):
    inp = grpcclient.InferInput("image", shape, "FP32")
    inp.set_data_from_numpy(np.zeros(shape, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], model_version=version)
    assert err.value.status() == code, err.value


def test_non_finite_input_is_refused_and_outputs_travel_raw(client):
    inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.full((1, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [inp])
    assert "NaN or Inf" in err.value.message()
    inp.set_data_from_numpy(np.full((1, 1, 8, 8), 3e38, np.float32))
    out = client.infer(MODEL, [inp]).as_numpy("logits")  # raw bytes carry Inf as they are
    assert out.shape == (1, 10) and not np.isfinite(out).all()


def test_sigterm_turns_grpc_health_not_serving_then_exits(digits_artifact, tmp_path):
    """The process: gRPC health SERVING once warm, NOT_SERVING from SIGTERM (inside the drain), exit 0."""
    import signal

    from optimodel.batching import write_batching_config

    from .conftest import start_server_process, wait_ready

    config = tmp_path / "batching.json"
    write_batching_config(config, BatchingConfig(max_wait_ms=1, max_batch_size=32))
    port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "server.log", "w")
    proc = start_server_process(digits_artifact, config, port, "--grpc-port", str(grpc_port), "--drain-seconds", "3",
                                log=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            check = lambda: probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # noqa: E731
            import time
            deadline = time.monotonic() + 10
            while check() != health_pb2.HealthCheckResponse.SERVING:  # mirrored every 0.1 s
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while check() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "gRPC health still SERVING after SIGTERM"
                time.sleep(0.05)
            # still answering inside the drain window, as REST does, while endpoint removal propagates
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
            assert c.infer(MODEL, [inp]).as_numpy("logits").shape == (1, 10)
            assert not c.is_server_ready()
            c.close()
        assert proc.wait(timeout=30) == 0
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
    assert f"and grpc://127.0.0.1:{grpc_port}" in (tmp_path / "server.log").read_text()
