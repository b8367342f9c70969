"""Plain functions: protocol parsing/encoding, CPU quota, buckets, session options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimodel.spec import TensorSpec
from serving_image import protocol
from serving_image.metrics import latency_buckets

TOKENS = protocol.ModelIO("minilm", [TensorSpec(name="input_ids", dtype="int64", shape=[-1, 4]),
                                     TensorSpec(name="attention_mask", dtype="int64", shape=[-1, 4])],
                          [TensorSpec(name="embedding", dtype="float32", shape=[-1, 3])])


def _two_inputs(ids, mask, **extra) -> bytes:
    return json.dumps({"inputs": [
        {"name": "input_ids", "shape": [len(ids), 4], "datatype": "INT64", "data": ids},
        {"name": "attention_mask", "shape": [len(mask), 4], "datatype": "INT64", "data": mask}], **extra}).encode()


def test_two_inputs_parse_into_int64_arrays():
    req = protocol.parse_infer_request(_two_inputs([[1, 2, 3, 4]], [[1, 1, 0, 0]], id="a"), None, TOKENS, 8)
    assert req.batch == 1 and req.id == "a"
    assert req.inputs["input_ids"].dtype == np.int64 and req.inputs["attention_mask"].tolist() == [[1, 1, 0, 0]]
    assert req.outputs == [("embedding", False)]


@pytest.mark.parametrize("body,message", [
    (_two_inputs([[1, 2, 3, 4.5]], [[1, 1, 1, 1]]), "INT64 data must hold integers only, got float"),
    (_two_inputs([[1, 2, 3, 4]], [[1, 1, 1, 1], [1, 1, 1, 1]]), "batch size 2 differs from the other inputs' 1"),
    (json.dumps({"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
                ).encode(), "missing input(s) attention_mask"),
    (json.dumps({"inputs": [{"name": "input_ids", "shape": [0, 4], "datatype": "INT64", "data": []}]}).encode(),
     "dimension 0 is 0"),
])
def test_token_model_bad_input(body, message):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.parse_infer_request(body, None, TOKENS, 8)
    assert message in str(err.value) and err.value.status == 400


def test_response_json_and_binary_round_trip():
    req = protocol.InferRequest(id="r1", inputs={}, batch=2, outputs=[("embedding", False)])
    emb = np.array([[0.1, 0.2, 0.3], [1e-8, -2.5, 3.0]], np.float32)
    body, hlen = protocol.encode_infer_response("minilm", req, {"embedding": emb})
    doc = json.loads(body)
    assert hlen is None and doc["id"] == "r1" and doc["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32).reshape(2, 3), emb)
    req.outputs = [("embedding", True)]
    body, hlen = protocol.encode_infer_response("minilm", req, {"embedding": emb})
    head = json.loads(body[:hlen])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[hlen:], np.float32).reshape(2, 3), emb)


def test_decode_body_bounds_decompression():
    import gzip

    bomb = gzip.compress(b"0" * 10_000)
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_body(bomb, "gzip", 1000)
    assert err.value.status == 413
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_body(b"x", "br", 1000)
    assert err.value.status == 415


def test_buckets():
    b = latency_buckets()
    assert b[0] == 0.0005 and b[-1] == 10.0 and b == sorted(b)
    assert all(round(hi - lo, 6) <= 0.001 for lo, hi in zip(b, b[1:]) if hi <= 0.02)


VEC = protocol.ModelIO("vec", [TensorSpec(name="x", dtype="float32", shape=[-1, 3])],
                       [TensorSpec(name="y", dtype="float32", shape=[-1, 3])])
BYTE = protocol.ModelIO("byte", [TensorSpec(name="x", dtype="uint8", shape=[-1, 3])],
                        [TensorSpec(name="y", dtype="float32", shape=[-1, 3])])


def _vec(data, datatype="FP32", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype, "data": data}],
                       **extra}).encode()


def test_fast_and_careful_json_conversion_agree():
    """A body with no r or l takes the one-pass array conversion; an id with both forces the careful
    path: the same numbers must come out of both, ints accepted for FP32."""
    data = [0.1, -2, 3.4028234663852886e38]
    fast = protocol.parse_infer_request(_vec(data), None, VEC, 4).inputs["x"]
    careful = protocol.parse_infer_request(_vec(data, id="rl"), None, VEC, 4).inputs["x"]
    assert fast.dtype == careful.dtype == np.float32 and fast.shape == careful.shape == (1, 3)
    np.testing.assert_array_equal(fast, careful)
    np.testing.assert_array_equal(fast, np.array([data], np.float32))


@pytest.mark.parametrize("model,body,message", [
    (VEC, _vec(["1.5", 2, 3]), "FP32 data must hold numbers only, got str values"),
    (VEC, _vec([True, 2, 3]), "FP32 data must hold numbers only, got bool values"),
    (VEC, _vec([1e39, 2, 3]), "contains NaN or Inf"),
    (BYTE, _vec([300, 2, 3], "UINT8"), "data cannot be read as UINT8"),
    (BYTE, _vec([-1, 2, 3], "UINT8"), "data cannot be read as UINT8"),
])
def test_json_data_refused_on_the_fast_path(model, body, message):
    assert b"r" not in body.replace(b"true", b"") and b"l" not in body  # the fast path is the one tried
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.parse_infer_request(body, None, model, 4)
    assert message in str(err.value) and err.value.status == 400
