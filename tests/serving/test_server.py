"""The server over real HTTP: tritonclient (JSON and binary), metadata, health, metrics."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from .conftest import MODEL, sample


def _tensors(x, binary: bool):
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return [inp], [tc.InferRequestedOutput("logits", binary_data=binary)]


def _infer(client, x, binary: bool, request_id: str = ""):
    inputs, outputs = _tensors(x, binary)
    return client.infer(MODEL, inputs, outputs=outputs, request_id=request_id)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_onnxruntime(serve, digits_images, reference, binary):
    srv = serve()
    client = tc.InferenceServerClient(srv.url.removeprefix("http://"))
    for batch in (1, 5, 32):
        x = digits_images[:batch]
        result = _infer(client, x, binary, request_id=f"req-{batch}")
        got = result.as_numpy("logits")
        assert got.dtype == np.float32 and got.shape == (batch, 10)
        # same batch through the same engine: bit-identical, JSON included (float32 round-trips)
        np.testing.assert_array_equal(got, reference(x))
        assert result.get_response()["id"] == f"req-{batch}"


def test_outputs_default_to_binary_when_none_requested(serve, digits_images, reference):
    srv = serve()
    client = tc.InferenceServerClient(srv.url.removeprefix("http://"))
    inp = tc.InferInput("image", [2, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(digits_images[:2], binary_data=True)
    result = client.infer(MODEL, [inp])
    np.testing.assert_array_equal(result.as_numpy("logits"), reference(digits_images[:2]))
    assert "binary_data_size" in result.get_response()["outputs"][0]["parameters"]


def test_concurrent_requests_are_batched_and_split_back(serve, digits_images, reference):
    srv = serve(max_wait_ms=20)
    client = tc.InferenceServerClient(srv.url.removeprefix("http://"), concurrency=16)
    sizes = [1, 3, 2, 5, 1, 4, 2, 1, 6, 3, 1, 2, 2, 1]
    offsets = np.cumsum([0] + sizes)
    # async_infer: the client's own 16 greenlets (its gevent sockets must not be shared between threads)
    pending = []
    for i, (o, n) in enumerate(zip(offsets, sizes)):
        inputs, outputs = _tensors(digits_images[o:o + n], bool(i % 2))
        pending.append(client.async_infer(MODEL, inputs, outputs=outputs))
    results = [p.get_result() for p in pending]
    for (o, n), r in zip(zip(offsets, sizes), results):
        np.testing.assert_allclose(r.as_numpy("logits"), reference(digits_images[o:o + n]), rtol=1e-5, atol=1e-5)
    batcher = srv.app.batcher
    assert batcher.batches < len(sizes), "requests arriving together should share engine calls"


def test_health_and_metadata(serve):
    srv = serve()
    client = tc.InferenceServerClient(srv.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    assert srv.app.server_state.warmed_sizes == [1, 2, 4, 8, 16, 32]


def test_metrics_after_traffic(serve, digits_images):
    srv = serve()
    client = tc.InferenceServerClient(srv.url.removeprefix("http://"))
    for _ in range(5):
        _infer(client, digits_images[:3], True)
    httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", content=b"{not json")
    text = httpx.get(f"{srv.url}/metrics").text
    assert sample(text, "optimodel_request_latency_seconds_count") == 5
    assert sample(text, "optimodel_request_latency_seconds_bucket", le="0.0005") is not None
    assert sample(text, "optimodel_request_latency_seconds_bucket", le="0.013") is not None  # 1 ms resolution
    assert sample(text, "optimodel_batch_size_sum") == 15
    assert sample(text, "optimodel_queue_wait_seconds_count") == 5
    assert sample(text, "optimodel_compute_seconds_count") == 5
    assert sample(text, "optimodel_inflight_requests") == 0
    assert sample(text, "optimodel_max_wait_ms") == 2
    assert sample(text, "optimodel_max_batch_size") == 32
    assert sample(text, "optimodel_errors_total", reason="bad_request") == 1
    assert sample(text, "optimodel_rejected_total", reason="queue_full") == 0


class GatedBackend:
    """The real engine behind a gate, to hold the server in its warm-up."""

    def __init__(self, inner, fail: bool = False):
        import threading

        self.inner, self.fail = inner, fail
        self.gate = threading.Event()
        for attr in ("platform", "arch", "max_batch_size", "inputs", "outputs"):
            setattr(self, attr, getattr(inner, attr))

    def run(self, feeds):
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("no kernel image for this GPU")
        return self.inner.run(feeds)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("fail", [False, True], ids=["slow-warm-up", "failed-warm-up"])
def test_not_ready_until_every_bucket_is_warm(digits_artifact, digits_images, fail):
    from optimodel.artifact import open_artifact
    from optimodel.batching import BatchingConfig
    from serving_image.app import create_app
    from serving_image.backends import load_backend

    from .conftest import ThreadedServer

    local, manifest = open_artifact(digits_artifact.as_uri())
    backend = GatedBackend(load_backend(local, manifest, threads=1), fail=fail)
    app = create_app(backend, manifest, BatchingConfig(max_wait_ms=0, max_batch_size=32))
    server = ThreadedServer(app).start()
    url = server.url
    try:
        assert httpx.get(f"{url}/v2/health/live").status_code == 200  # listening while it warms
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{url}/v2/models/{MODEL}/ready").status_code == 503
        body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
        r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 503 and "warming up" in r.json()["error"]
        backend.gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        if fail:
            assert httpx.get(f"{url}/v2/health/ready").status_code == 503
            r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
            assert r.status_code == 503 and "warm-up failed: no kernel image" in r.json()["error"]
        else:
            assert httpx.get(f"{url}/v2/health/ready").status_code == 200
            assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body).status_code == 200
            assert sample(httpx.get(f"{url}/metrics").text, "optimodel_rejected_total", reason="not_ready") == 1
    finally:
        server.__exit__(None, None, None)
