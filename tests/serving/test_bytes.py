"""BYTES tensors end to end: JSON strings and length-prefixed binary, through the batcher, into ONNX Runtime.

The model is a real ONNX graph over tensor(string): Identity (an echo) and RegexFullMatch
(is the text all digits?), so the answers prove the text reached the engine intact.
"""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from optimodel.artifact import EngineInfo, Manifest, publish
from optimodel.batching import BatchingConfig
from optimodel.spec import TensorSpec
from serving_image import protocol

from .conftest import app_server

TEXTS = ["héllo wörld", "12345", "", "x" * 300, "日本語 42", "007"]


def _text_model(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"]),
         helper.make_node("RegexFullMatch", ["text"], ["is_number"], pattern="[0-9]+")],
        "text", [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 1]),
         helper.make_tensor_value_info("is_number", TensorProto.BOOL, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    src = root / "src"
    src.mkdir()
    _text_model(src / "model.onnx")
    manifest = Manifest(cache_key="t" * 64, model_name="text", arch="cpu",
                        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
                        inputs=[TensorSpec(name="text", dtype="string", shape=[-1, 1])],
                        outputs=[TensorSpec(name="echo", dtype="string", shape=[-1, 1]),
                                 TensorSpec(name="is_number", dtype="bool", shape=[-1, 1])],
                        max_batch_size=16, versions={"onnxruntime": ort.__version__}, files=[])
    publish(src, manifest, (root / "store").as_uri())
    # a 40 ms window: concurrent requests share an engine call
    with app_server(root / "store", BatchingConfig(max_wait_ms=40, max_batch_size=16), grpc=True) as srv:
        yield srv


def _expected_numbers(texts):
    return [t.isascii() and t.isdigit() for t in texts]


def test_metadata_says_bytes(server):
    meta = httpx.get(f"{server.url}/v2/models/text").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_round_trip(server, binary):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    arr = np.array([[t.encode()] for t in TEXTS], dtype=object)
    inp = httpclient.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr, binary_data=binary)
    outs = [httpclient.InferRequestedOutput("echo", binary_data=binary),
            httpclient.InferRequestedOutput("is_number", binary_data=binary)]
    result = client.infer("text", [inp], outputs=outs)
    echo = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("echo").ravel()]
    assert echo == TEXTS
    assert result.as_numpy("is_number").ravel().tolist() == _expected_numbers(TEXTS)
    client.close()


def test_tritonclient_grpc_round_trip(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    arr = np.array([[t.encode()] for t in TEXTS], dtype=object)
    inp = grpcclient.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    result = client.infer("text", [inp])
    assert [v.decode() for v in result.as_numpy("echo").ravel()] == TEXTS
    assert result.as_numpy("is_number").ravel().tolist() == _expected_numbers(TEXTS)
    client.close()


async def test_concurrent_text_requests_share_a_batch_and_split_back(server):
    before = server.app.batcher.batches
    bodies = [json.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [t]}]})
              for t in TEXTS]
    async with httpx.AsyncClient(base_url=server.url) as client:
        answers = await asyncio.gather(*(client.post("/v2/models/text/infer", content=b) for b in bodies))
    for text, r in zip(TEXTS, answers):
        assert r.status_code == 200, r.text
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["echo"] == {"name": "echo", "datatype": "BYTES", "shape": [1, 1], "data": [text]}
        assert outs["is_number"]["data"] == _expected_numbers([text])
    assert server.app.batcher.batches - before < len(TEXTS), "text requests should have shared a batch"


def _lp(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@pytest.mark.parametrize("blob,count,message", [
    (_lp(b"ok") + b"\x05\x00", 2, "BYTES data ends at element 1 of 2"),
    (_lp(b"ok") + struct.pack("<I", 99) + b"abc", 2, "element 1 claims 99 bytes, 3 are left"),
    (_lp(b"ok", b"ok", b"extra"), 2, "bytes after the last of 2 BYTES elements"),
    (_lp(b"ok", b"\xff\xfe"), 2, "not UTF-8 text"),
])
def test_bad_binary_bytes(server, blob, count, message):
    head = json.dumps({"inputs": [{"name": "text", "shape": [count, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    r = httpx.post(f"{server.url}/v2/models/text/infer", content=head + blob,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_bytes_json_must_be_strings(server):
    body = json.dumps({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["a", 5]}]})
    r = httpx.post(f"{server.url}/v2/models/text/infer", content=body)
    assert r.status_code == 400 and "BYTES data must hold strings only, got int" in r.json()["error"], r.text


def test_length_prefixed_codec_round_trips():
    arr = np.array(TEXTS, dtype=object)
    raw = protocol.encode_bytes_tensor(arr)
    assert raw[:4] == struct.pack("<I", len(TEXTS[0].encode()))
    assert protocol.decode_bytes_tensor(raw, len(TEXTS), "t").tolist() == TEXTS
