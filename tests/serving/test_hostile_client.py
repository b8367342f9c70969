"""What a hostile client found (issue #11, point 6), one test per finding, over real HTTP.

Each case was a wrong answer before: a 500 for deep nesting, NaN in a JSON body, a
stalled upload held forever (and the drain with it), goodput collapse under overload,
and lenient parsing of numbers, header lengths, versions, methods and request lines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from optimodel.batching import BatchingConfig, write_batching_config

from .conftest import MODEL, SlowBackend, app_server, free_port, sample, start_server_process, wait_ready

INFER = f"/v2/models/{MODEL}/infer"
GOOD = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}


def _req(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


@pytest.fixture(scope="module")
def server(digits_artifact):
    with app_server(digits_artifact, BatchingConfig(max_wait_ms=1, max_batch_size=32), body_timeout_s=0.5) as srv:
        yield srv


def _errors(url: str, reason: str) -> float:
    return sample(httpx.get(f"{url}/metrics").text, "optimodel_errors_total", reason=reason) or 0.0


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_400_counted_as_an_error(server, depth):
    before = _errors(server.url, "bad_request")
    body = b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ' + \
        b"[" * depth + b"]" * depth + b"}]}"
    r = httpx.post(server.url + INFER, content=body)
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]
    assert _errors(server.url, "bad_request") == before + 1


def test_data_nested_deeper_than_the_shape_is_refused(server):
    r = httpx.post(server.url + INFER, content=_req({**GOOD, "data": [[[[[[0.5] * 8] * 8]]]]}))
    assert r.status_code == 400 and "nested deeper than the tensor's rank 4" in r.json()["error"], r.text
    # nested exactly as the shape is fine
    r = httpx.post(server.url + INFER, content=_req({**GOOD, "data": [[[[0.5] * 8] * 8]]}))
    assert r.status_code == 200, r.text


def _no_constant(name: str):
    raise AssertionError(f"{name} in a JSON body is not JSON")


def test_non_finite_outputs_never_make_invalid_json(server):
    """3e38 is a finite FP32 input that overflows the logits to Inf; JSON cannot carry that."""
    big = _req({**GOOD, "data": [3e38] * 64})
    before = _errors(server.url, "non_finite_output")
    r = httpx.post(server.url + INFER, content=big)
    json.loads(r.content, parse_constant=_no_constant)  # whatever the answer, it is strict JSON
    assert r.status_code == 400 and "binary_data" in r.json()["error"], r.text
    assert _errors(server.url, "non_finite_output") == before + 1
    # the binary form carries the raw values
    r = httpx.post(server.url + INFER, content=_req({**GOOD, "data": [3e38] * 64},
                                                    outputs=[{"name": "logits", "parameters": {"binary_data": True}}]))
    assert r.status_code == 200, r.text
    hlen = int(r.headers["inference-header-content-length"])
    values = np.frombuffer(r.content[hlen:], np.float32)
    assert values.size == 10 and not np.isfinite(values).all()


@pytest.mark.parametrize("data,word", [(["0.5"] * 64, "str"), ([True] * 64, "bool"),
                                       ([0.5] * 63 + [False], "bool"), ([0.5] * 63 + [None], "NoneType")])
def test_fp32_data_must_be_numbers(server, data, word):
    r = httpx.post(server.url + INFER, content=_req({**GOOD, "data": data}))
    assert r.status_code == 400, r.text
    assert "FP32 data must hold numbers only" in r.json()["error"] and word in r.json()["error"]


@pytest.mark.parametrize("value", ["1 53", "+153", "1_53", "-1", "١٥٣", "153.0"])
def test_header_length_must_be_plain_digits(server, value):
    body = _req(GOOD)
    # raw bytes: httpx refuses to send some of these values at all
    answer = _raw(server.port, f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               f"Content-Length: {len(body)}\r\n".encode()
                  + b"Inference-Header-Content-Length: " + value.encode() + b"\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"digits only" in answer


def test_unknown_model_version_is_404(server):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/999/infer", content=_req(GOOD))
    assert r.status_code == 404 and "unknown version '999'" in r.json()["error"], r.text
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/versions/1/infer", content=_req(GOOD)).status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/999").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/999/ready").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/ready").status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_on_infer_is_405(server, method):
    r = httpx.request(method, server.url + INFER)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == "POST" and "use POST" in r.json()["error"]


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_request_line_without_http_version_is_not_answered_as_valid(server):
    answer = _raw(server.port, b"GET /v2/health/live\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer == b"" or answer.split(b" ", 2)[1][:1] in (b"4", b"5"), answer[:200]


def test_stalled_upload_is_answered_408_and_let_go(server):
    """Headers and part of the body, then nothing: the server answers once its body timeout passes."""
    before = _errors(server.url, "body_timeout")
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\nConnection: close\r\n\r\n").encode()
    answer = _raw(server.port, head + b'{"inputs": [')  # recv blocks until the server answers and closes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.5 s" in answer
    assert _errors(server.url, "body_timeout") == before + 1


def test_sigterm_drain_finishes_within_grace_whatever_clients_do(digits_artifact, tmp_path):
    """Stalled uploads (body timeout far past the grace period) do not keep a stopping server alive."""
    config = tmp_path / "batching.json"
    write_batching_config(config, BatchingConfig(max_wait_ms=1, max_batch_size=32))
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = start_server_process(digits_artifact, config, port, "--body-timeout-seconds", "600",
                                "--grace-seconds", "3", log=log)
    socks = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{{\"in".encode())
            socks.append(s)
        # every upload reached the handler (inflight) before SIGTERM
        deadline = time.monotonic() + 20
        while sample(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "optimodel_inflight_requests") < 50:
            assert time.monotonic() < deadline, "stalled uploads never reached the handler"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # the grace period is 3 s; 20 s is a hang detector, not a timing assertion
        assert proc.wait(timeout=20) == 0
        # each stalled upload was answered 408 at the stop, not cancelled by the backstop timeout
        for s in socks:
            s.settimeout(10)
            assert s.recv(200).startswith(b"HTTP/1.1 408")
        assert "Exception in ASGI application" not in (tmp_path / "server.log").read_text()
    finally:
        log.close()
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()


async def test_overload_is_refused_by_time_at_once(digits_artifact):
    """A burst far past what 100 ms can serve: the excess gets 503 + Retry-After, the rest is served."""
    # 20 ms per batch of 4: about 5 batches (20 requests) fit in the 100 ms deadline
    with app_server(digits_artifact, BatchingConfig(max_wait_ms=0, max_batch_size=4, max_queue=1024),
                    wrap_backend=SlowBackend, deadline_s=0.1) as srv:
        async with httpx.AsyncClient(base_url=srv.url, limits=httpx.Limits(max_connections=200),
                                     timeout=30) as client:
            answers = await asyncio.gather(*(client.post(INFER, content=_req(GOOD)) for _ in range(200)))
            ok = [r for r in answers if r.status_code == 200]
            busy = [r for r in answers if r.status_code == 503]
            assert len(ok) + len(busy) == len(answers), {r.status_code for r in answers}
            assert ok and busy, (len(ok), len(busy))
            # the length bound (1024) never came into play: the time bound kept the backlog to
            # about the deadline's worth of batches (5 batches of 4, plus the one running)
            assert len(ok) <= 40, len(ok)
            for r in busy:
                assert int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"]
            text = (await client.get("/metrics")).text
            assert sample(text, "optimodel_rejected_total", reason="deadline") == len(busy)
            assert (await client.post(INFER, content=_req(GOOD))).status_code == 200
