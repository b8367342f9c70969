"""serving_image.http_server over real sockets: what a production HTTP/1.1 server must do.

A small handler stands in for the model so each behaviour is seen alone: keep-alive,
pipelining in order (also when a later answer is ready first), HTTP/1.0, Expect:
100-continue, chunked bodies, HEAD, limits and time limits, malformed requests, and the
graceful stop. The model's own routes over this server are tested in test_server.py and
test_hostile_client.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import orjson
import pytest

from serving_image.http_server import MAX_HEADER_BYTES, HttpServer, Later, Response

JSON = ((b"content-type", b"application/json"),)
BIG = b"b" * (256 * 1024)


class Echo:
    """POST /echo answers the body; POST /slow?ms answers after ms (a Future, like infer);
    GET /early answers from head(); anything else 404. abandon() records what it was told."""

    def __init__(self):
        self.abandoned: list[tuple[str, int, str]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def head(self, req):
        if req.path == "/early":
            return Response(200, b"early", JSON)
        if req.path == "/big":
            return Response(200, BIG, JSON)
        if req.path in ("/echo", "/slow"):
            return None
        return Response(404, self.error_body("no route"), JSON)

    def handle(self, req):
        if req.path == "/slow":
            fut = self.loop.create_future()
            self.loop.call_later(int(req.query) / 1000, fut.set_result, req.body)
            return Later(fut, lambda f: Response(200, f.result(), JSON))
        return Response(200, req.body, JSON)

    def abandon(self, req, status, message, reason):
        self.abandoned.append((req.path, status, reason))
        return Response(status, self.error_body(message), JSON)

    def error_body(self, message):
        return orjson.dumps({"error": message})


class Running:
    """HttpServer on uvloop in a thread; stop(timeout) runs its graceful shutdown."""

    def __init__(self, **limits):
        self.handler = Echo()
        self.limits = {"max_body_bytes": 1000, "body_timeout_s": 0.3, **limits}
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self):
        import uvloop

        async def main():
            self.loop = self.handler.loop = asyncio.get_running_loop()
            self.stopping = asyncio.Event()
            server = self.server = HttpServer(self.handler, **self.limits)
            await server.listen("127.0.0.1", 0)
            self.port = server.port
            self.ready.set()
            await self.stopping.wait()
            await server.shutdown(self.stop_timeout)

        uvloop.run(main())

    def stop(self, timeout: float = 5.0) -> float:
        """Seconds the graceful stop took."""
        self.stop_timeout = timeout
        t0 = time.monotonic()
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        assert not self.thread.is_alive()
        return time.monotonic() - t0

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return s


@pytest.fixture
def server():
    srv = Running()
    yield srv
    if srv.thread.is_alive():
        srv.stop()


def read_answers(s: socket.socket, n: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """n responses from a socket (Content-Length framed, as this server always frames them)."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers: {buf!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
        length = int(headers.get(b"content-length", b"0"))
        while len(buf) < length:
            buf += s.recv(65536)
        out.append((status, headers, buf[:length]))
        buf = buf[length:]
    return out


def closed(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_keep_alive_and_pipelining_answer_in_order(server):
    s = server.connect()
    # the first answer takes 100 ms, the two behind it are ready at once: order must still hold
    s.sendall(post("/slow?100", b"one") + post("/echo", b"two") + b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = read_answers(s, 3)
    assert [(st, body) for st, _, body in answers] == [(200, b"one"), (200, b"two"), (200, b"early")]
    assert all(b"connection" not in h for _, h, _ in answers)  # kept alive
    s.sendall(post("/echo", b"again"))
    assert read_answers(s, 1)[0][2] == b"again"
    s.close()


def test_http_1_0_closes_unless_keep_alive_is_asked(server):
    s = server.connect()
    s.sendall(b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    (status, headers, body), = read_answers(s, 1)
    assert (status, body, headers[b"connection"]) == (200, b"hi", b"close") and closed(s)
    s = server.connect()
    s.sendall(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
    assert read_answers(s, 1)[0][2] == b"hi"
    s.sendall(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nyou")
    assert read_answers(s, 1)[0][2] == b"you"


def test_expect_100_continue_and_chunked_bodies(server):
    s = server.connect()
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"hello")
    assert read_answers(s, 1)[0][2] == b"hello"
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert read_answers(s, 1)[0][2] == b"abcde"
    # httpx, a real client, agrees on both
    assert httpx.post(server.url + "/echo", content=iter([b"x" * 10, b"y" * 5])).content == b"x" * 10 + b"y" * 5


def test_head_has_the_length_but_no_body(server):
    s = server.connect()
    s.sendall(b"HEAD /early HTTP/1.1\r\nHost: x\r\n\r\nGET /early HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"early"):
        data += s.recv(4096)
    first, second = data.split(b"HTTP/1.1 200 OK", 2)[1:]
    assert b"content-length: 5\r\n" in first and first.endswith(b"\r\n\r\n")  # no body after HEAD's headers
    assert second.endswith(b"\r\n\r\nearly")


def test_thousands_of_pipelined_requests_in_one_read_are_all_answered_in_order(server):
    s = server.connect()
    n = 3000
    s.sendall(b"".join(f"GET /early?{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(n)))
    answers = read_answers(s, n)
    assert len(answers) == n and all(status == 200 and body == b"early" for status, _, body in answers)


def test_a_client_that_pipelines_and_reads_late_holds_little_server_memory():
    """Flow control: past the transport's high-water mark nothing more is answered or read until
    the client reads; without it all 100 answers (25 MB) would sit in the server's buffer."""
    srv = Running(body_timeout_s=10.0)
    try:
        s = srv.connect()
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        time.sleep(0.5)
        buffered = sum(c.transport.get_write_buffer_size() for c in list(srv.server.connections)
                       if c.transport is not None)
        assert buffered < 2 * len(BIG), buffered
        answers = read_answers(s, 100)  # and once the client reads, every answer comes, in full
        assert all(status == 200 and body == BIG for status, _, body in answers)
    finally:
        srv.stop()


def test_a_client_that_never_reads_is_dropped_after_the_body_timeout(server):
    s = server.connect()
    s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
    deadline = time.monotonic() + 10  # a hang detector; the timeout is 0.3 s
    while server.server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.server.connections


@pytest.mark.parametrize("how", ["declared", "chunked"])
def test_a_body_past_the_limit_is_413_and_the_connection_closes(server, how):
    s = server.connect()
    if how == "declared":  # refused on the header alone: nothing of the body is read
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    else:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"".join(b"1f4\r\n" + b"z" * 500 + b"\r\n" for _ in range(3)))
    (status, headers, body), = read_answers(s, 1)
    assert status == 413 and b"exceeds the limit of 1000 bytes" in body and headers[b"connection"] == b"close"
    assert closed(s)
    assert server.handler.abandoned == [("/echo", 413, "body_too_large")]


def test_a_stalled_body_is_408_from_the_handler(server):
    s = server.connect()
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
    (status, _, body), = read_answers(s, 1)
    assert status == 408 and b"did not arrive within 0.3 s" in body and closed(s)
    assert server.handler.abandoned == [("/echo", 408, "body_timeout")]


def test_slow_headers_are_408_and_idle_connections_close():
    srv = Running(body_timeout_s=0.3, keep_alive_s=0.3)
    try:
        slow = srv.connect()
        slow.sendall(b"GET /early HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        idle = srv.connect()
        (status, _, body), = read_answers(slow, 1)
        assert status == 408 and b"headers did not arrive" in body and closed(slow)
        assert closed(idle)  # sent nothing: closed after keep_alive_s, no answer owed
    finally:
        srv.stop()


def test_oversized_headers_are_431(server):
    s = server.connect()
    s.sendall(b"GET /early HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
    (status, headers, _), = read_answers(s, 1)
    assert status == 431 and headers[b"connection"] == b"close" and closed(s)


@pytest.mark.parametrize("raw", [b"NOT A REQUEST\r\n\r\n", b"GET /early HTTP/1.1\r\nBad Header\r\n\r\n",
                                 b"GET /early HTTP/2.0\r\nHost: x\r\n\r\n"])
def test_malformed_requests_are_answered_and_closed(server, raw):
    s = server.connect()
    s.sendall(raw)
    (status, headers, body), = read_answers(s, 1)
    assert status in (400, 505) and headers[b"connection"] == b"close" and orjson.loads(body)["error"]
    assert closed(s)
    # the server is still fine for everyone else
    assert httpx.get(server.url + "/early").content == b"early"


@pytest.mark.parametrize("path", ["/early", "/echo"])
def test_an_upgrade_is_ignored_the_request_answered_and_the_connection_closed(server, path):
    s = server.connect()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Content-Length: 0\r\n\r\n".encode())
    (status, headers, _), = read_answers(s, 1)
    assert status == 200 and headers[b"connection"] == b"close" and closed(s)


def test_an_early_answer_skips_a_short_body_and_keeps_the_connection(server):
    s = server.connect()
    s.sendall(post("/nowhere", b"x" * 500) + post("/echo", b"after"))
    answers = read_answers(s, 2)
    assert [(st, b) for st, _, b in answers][1] == (200, b"after") and answers[0][0] == 404


def test_graceful_stop_answers_what_was_read_cuts_uploads_and_closes_idle():
    srv = Running(body_timeout_s=60.0)
    busy, upload, idle = srv.connect(), srv.connect(), srv.connect()
    busy.sendall(post("/slow?300", b"done"))
    upload.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npart")
    idle.sendall(post("/echo", b"x"))
    assert read_answers(idle, 1)[0][2] == b"x"
    time.sleep(0.1)  # the slow request is in the handler, the upload's headers are in
    took = srv.stop(timeout=5.0)
    (status, headers, body), = read_answers(busy, 1)
    assert (status, body, headers[b"connection"]) == (200, b"done", b"close")
    (status, _, body), = read_answers(upload, 1)
    assert status == 408 and b"before the server stopped" in body
    for s in (busy, upload, idle):
        assert closed(s)
    assert took < 3, took
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1)


def test_graceful_stop_is_bounded_whatever_the_handler_does():
    srv = Running()
    s = srv.connect()
    s.sendall(post("/slow?60000", b"never"))
    time.sleep(0.1)
    took = srv.stop(timeout=0.5)
    assert 0.4 < took < 3, took
    assert closed(s)
