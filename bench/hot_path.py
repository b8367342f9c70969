"""Microbenchmarks of each piece of the JSON infer hot path, timed alone (timeit, best of 5).

The MLP's request (one sample, 256 FP32 as JSON), its 10-float answer, the batcher's
submit -> batch -> result round trip at batch 10 with a do-nothing engine, the HTTP
server's own Python (HttpConnection fed bytes, a handler that answers at once), and admission.
Each figure is microseconds per request on this process's one core; the sum against the
server's CPU per request (bench/serving.py) says how much of it is ours and how much HTTP.

Usage: python bench/hot_path.py
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
import timeit
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from optimodel.batching import BatchingConfig  # noqa: E402
from optimodel.spec import TensorSpec  # noqa: E402
from serving_image import protocol  # noqa: E402
from serving_image.batcher import Batcher  # noqa: E402
from serving_image.metrics import ServerMetrics  # noqa: E402


def _spec(name, shape):
    return TensorSpec.model_validate({"name": name, "dtype": "float32", "shape": shape})


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    model = protocol.ModelIO("mlp", [_spec("x", [-1, 256])], [_spec("y", [-1, 10])])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 256), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    out = {"y": rng.standard_normal((1, 10), dtype=np.float32)}
    req = protocol.parse_infer_request(body, None, model, 32)
    figures: dict[str, float] = {}
    figures["parse_infer_request (JSON, 256 FP32)"] = per_call_us(
        lambda: protocol.parse_infer_request(body, None, model, 32), 2000)
    figures["  of which orjson.loads"] = per_call_us(lambda: protocol._loads(body), 2000)
    figures["encode_infer_response (10 FP32)"] = per_call_us(
        lambda: protocol.encode_infer_response("mlp", req, out), 5000)
    figures.update(asyncio.run(_batcher_round_trip(req.inputs)))
    figures.update(_http_glue(body))
    metrics = ServerMetrics("mlp", "cpu")
    figures["metrics: latency observe + inflight inc/dec"] = per_call_us(
        lambda: (metrics.inflight.inc(), metrics.latency.observe(0.004), metrics.inflight.dec()), 20000)
    figures["time.monotonic()"] = per_call_us(time.monotonic, 100000)
    figures.update(_engine_after_idle())
    print(f"CPU: {cpu_model()}")
    for k, v in figures.items():
        print(f"{k:58s} {v:8.2f} us")
    print(json.dumps({k.strip(): round(v, 2) for k, v in figures.items()}))


async def _batcher_round_trip(inputs: dict[str, np.ndarray], batch: int = 10, rounds: int = 300) -> dict:
    """Per request: submit, the batch formed, concatenated, run (a copy: no engine), split, future set, awaited.

    Includes a task per request and asyncio.gather (about 4 us a request on their own), which the
    server does not pay: it answers from a callback on the batcher's future, with no task."""
    b = Batcher(lambda feeds: {"y": feeds["x"][:, :10].copy()}, BatchingConfig(max_batch_size=batch, max_wait_ms=50,
                                                                               max_queue=1024), engine_max_batch=32)
    await b.start()
    b.batch_seconds = 1e-4

    async def one():
        return await b.submit(inputs, 1, 2.0)

    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*[one() for _ in range(batch)])
        best = min(best, (time.process_time() - t0) / (rounds * batch) * 1e6)
    admit = per_call_us(lambda: b.admit(2.0, 1, time.monotonic()), 20000)
    await b.close()
    return {f"batcher submit -> result round trip (batch {batch}, both threads' CPU)": best,
            "batcher.admit": admit}


def _engine_after_idle(batch: int = 13, runs: int = 300) -> dict:
    """ONNX Runtime on the MLP (1 thread) at the server's mean batch, back to back and after an idle gap
    like the server's between batches (window 5 ms): per request, for the engine's share of the CPU."""
    import tempfile

    import onnxruntime as ort
    from _mlp import make_mlp_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = make_mlp_onnx(Path(tmp) / "mlp.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, 256), dtype=np.float32)
    for _ in range(50):
        session.run(None, {"x": x})
    out = {}
    for gap_ms in (0, 1, 4):
        spent = 0.0
        for _ in range(runs):
            if gap_ms:
                time.sleep(gap_ms / 1000)
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            spent += time.perf_counter() - t0
        out[f"ONNX Runtime MLP, batch {batch}, per request, {gap_ms} ms idle before each run"] = spent / runs / batch * 1e6
    return out


def _http_glue(body: bytes, rounds: int = 5000) -> dict:
    """http_server.HttpConnection from bytes in to bytes out (parser callbacks, Request, routing hook,
    the response's one write) with a handler that answers a fixed body at once: no socket, no engine."""
    from serving_image.http_server import HttpConnection, HttpServer, Response

    fixed = Response(200, b'{"model_name":"mlp","model_version":"1","outputs":[]}',
                     ((b"content-type", b"application/json"),))

    class Fixed:
        def head(self, req):
            return None

        def handle(self, req):
            return fixed

    class Transport:
        def write(self, data):
            pass

        def is_closing(self):
            return False

    server = HttpServer(Fixed(), max_body_bytes=1 << 20, body_timeout_s=10.0)
    conn = HttpConnection(server)
    conn.connection_made(Transport())
    raw = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json\r\n"
           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    best = min(timeit.repeat(lambda: conn.data_received(raw), number=rounds, repeat=5)) / rounds * 1e6
    return {"HTTP glue: parse request, Request, one write (no socket, parse or engine)": best}


if __name__ == "__main__":
    main()
