"""Bad input over raw HTTP: each gets a 4xx naming the problem and harms no other request."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct

import httpx
import numpy as np
import pytest

from .conftest import MODEL, sample

GOOD = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}


def _req(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _binary(header: dict, blob: bytes, header_len: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head) if header_len is None else header_len)}


BAD_JSON = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (_req(), "'inputs' must be a non-empty list"),
    (_req({**GOOD, "name": "pixels"}), "unknown input 'pixels'; model 'digits' expects: image"),
    (_req({**GOOD, "datatype": "INT64"}), "datatype 'INT64' does not match the model's FP32"),
    (_req({**GOOD, "shape": [1, 64]}), "shape [1, 64] has rank 2, the model expects rank 4"),
    (_req({**GOOD, "shape": [1, 1, 8, 9], "data": [0.5] * 72}), "dimension 3 must be 8"),
    (_req({**GOOD, "data": [0.5] * 63}), "data has 63 elements, shape [1, 1, 8, 8] needs 64"),
    (_req({**GOOD, "shape": [33, 1, 8, 8], "data": [0.5] * 64 * 33}), "batch size 33 exceeds maxBatchSize 32"),
    (_req({**GOOD, "data": ["a"] * 64}), "FP32 data must hold numbers only"),
    (_req({**GOOD, "data": [[0.5] * 3, [0.5] * 61]}), "ragged"),
    (_req(GOOD, GOOD), "input 'image' is given twice"),
    (_req({k: v for k, v in GOOD.items() if k != "data"}), "neither 'data' nor binary_data_size"),
    (_req(GOOD, outputs=[{"name": "probs"}]), "unknown output 'probs'; model 'digits' has: logits"),
    (_req(GOOD, outputs=[{"name": "logits", "parameters": {"classification": 3}}]), "classification extension"),
    (b'{"inputs": [{"name": "image", "shape": [1,1,8,8], "datatype": "FP32", "data": [NaN'
     + b", 0.5" * 63 + b"]}]}", "malformed JSON"),  # NaN is not JSON; the strict parser refuses it
]


@pytest.fixture(scope="module")
def server(digits_artifact, tmp_path_factory):
    from optimodel.artifact import open_artifact
    from optimodel.batching import BatchingConfig
    from serving_image.app import create_app
    from serving_image.backends import load_backend

    from .conftest import ThreadedServer

    local, manifest = open_artifact(digits_artifact.as_uri())
    config = BatchingConfig(max_wait_ms=30, max_batch_size=32)
    app = create_app(load_backend(local, manifest, threads=1), manifest, config, max_body_bytes=20_000)
    with ThreadedServer(app) as srv:
        yield srv


@pytest.mark.parametrize("body,message", BAD_JSON, ids=[m for _, m in BAD_JSON])
def test_bad_json_request(server, body, message):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def _good_blob() -> bytes:
    return np.full((1, 1, 8, 8), 0.5, np.float32).tobytes()


BIN_HEADER = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                          "parameters": {"binary_data_size": 256}}]}


@pytest.mark.parametrize("body,headers,message", [
    (*_binary(BIN_HEADER, _good_blob(), header_len=10_000), "but the body has only"),
    (*_binary(BIN_HEADER, _good_blob(), header_len=7), "malformed JSON"),
    (b"{}", {"Inference-Header-Content-Length": "abc"}, "must be an integer"),
    (*_binary(BIN_HEADER, _good_blob()[:100]), "runs past the end of the body"),
    (*_binary({"inputs": [{**BIN_HEADER["inputs"][0], "parameters": {"binary_data_size": 252}}]},
              _good_blob()[:252]), "252 bytes of binary data hold 63 FP32 elements"),
    (*_binary(BIN_HEADER, _good_blob() + b"xx"), "2 bytes of binary data after the last input"),
    (*_binary(BIN_HEADER, np.full((1, 1, 8, 8), np.inf, np.float32).tobytes()), "contains NaN or Inf"),
], ids=["header-too-long", "header-cut", "header-not-int", "blob-short", "blob-count", "blob-extra", "inf"])
def test_bad_binary_request(server, body, headers, message):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_body_over_limit_is_413(server):
    big = _req({**GOOD, "shape": [32, 1, 8, 8], "data": [0.123456789] * 64 * 32})
    assert len(big) > 20_000
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=big)
    assert r.status_code == 413 and "exceeds the limit of 20000 bytes" in r.json()["error"]
    # chunked, without Content-Length
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=iter([big[:15_000], big[15_000:]]))
    assert r.status_code == 413
    text = httpx.get(f"{server.url}/metrics").text
    assert sample(text, "optimodel_rejected_total", reason="body_too_large") >= 2


def test_gzip_request_is_accepted(server, reference):
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    body = gzip.compress(_req({**GOOD, "shape": [2, 1, 8, 8], "data": x.ravel().tolist()}))
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, reference(x))
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip" in r.json()["error"]


def test_unknown_model_is_404(server):
    r = httpx.post(f"{server.url}/v2/models/other/infer", content=_req(GOOD))
    assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]


async def test_bad_requests_do_not_affect_their_batch(server, reference):
    """Good and bad requests sent together inside one 30 ms batching window."""
    rng = np.random.default_rng(1)
    xs = [rng.random((n, 1, 8, 8), dtype=np.float32) for n in (1, 2, 3, 1, 2, 4)]
    bads = [body for body, _ in BAD_JSON]
    before = server.app.batcher.batches
    async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=64)) as client:
        good = [client.post(f"/v2/models/{MODEL}/infer",
                            content=_req({**GOOD, "shape": list(x.shape), "data": x.ravel().tolist()}))
                for x in xs]
        bad = [client.post(f"/v2/models/{MODEL}/infer", content=b) for b in bads]
        answers = await asyncio.gather(*good, *bad)
    for x, r in zip(xs, answers[:len(xs)]):
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(len(x), 10)
        np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    assert all(r.status_code == 400 for r in answers[len(xs):])
    assert server.app.batcher.batches - before < len(xs), "the good requests should have shared a batch"
    # and the server still answers afterwards
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=_req(GOOD)).status_code == 200


def test_protocol_struct_sanity():
    # guard for the blob helpers above: 64 float32 = 256 bytes
    assert len(_good_blob()) == 256 == struct.calcsize("64f")
