"""The serving pod's HTTP/1.1 server: httptools' parser under an asyncio.Protocol, nothing else.

Why not uvicorn: measured side by side (bench/http_floor.py, README "Serving figures"), a
do-nothing app cost 75-85 us of CPU per request on uvicorn + httptools + uvloop and 25-27 us
on a bare httptools Protocol; the model's whole budget is 120 us. The difference is ASGI
itself (a scope dict, receive/send coroutines, a Task per request, two writes per response).
Here a request is one object, its response one write, and a handler that has its answer at
once (health, metadata, refusals) or an asyncio.Future for it (infer) runs without a Task:
45-51 us on the same bench.

What it keeps from a production server, each one tested (tests/serving/test_http_server.py,
test_hostile_client.py): keep-alive with an idle timeout, pipelining in order, flow control
(a client that does not read its answers stops being read, and is dropped after the body
timeout), HTTP/1.0, Expect: 100-continue, chunked bodies, HEAD, a limit on header size (431)
and body size (413), time limits on headers (408) and bodies (408, the handler's answer), 400
on what httptools refuses, 505 for versions other than 1.0/1.1, and a graceful stop that
answers what it accepted within a bound whatever the clients do.

The application is any object with head/handle/abandon (see Handler); it speaks in Request
and Response and never sees the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Callable, NamedTuple, Protocol

import httptools

log = logging.getLogger("serving_image")

KEEP_ALIVE_S = 5.0  # uvicorn's default: an idle connection is closed after this
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
# early answers (a refusal before the body arrived) keep the connection and skip the body when it
# is at most this long; a longer one is not worth reading to keep the connection: it is closed
DISCARD_BODY_BYTES = 1024 * 1024
MAX_PIPELINED = 16  # requests read ahead on one connection before reading pauses

_JSON = ((b"content-type", b"application/json"),)
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus}


class Request:
    """One request as the handler sees it. `body` is complete when handle() is called."""

    __slots__ = ("method", "path", "query", "headers", "body", "chunks", "version", "keep_alive", "arrived",
                 "early", "body_size", "body_done", "dispatched", "context")

    def __init__(self, method: str, path: str, query: bytes, headers: dict[bytes, bytes], version: str,
                 keep_alive: bool, arrived: float):
        self.method = method
        self.path = path  # as sent (percent-encoded): split before unquoting so %2F stays in its segment
        self.query = query
        self.headers = headers  # names lowercased; a repeated header keeps its last value
        self.body = b""
        self.chunks: list[bytes] = []  # the body as it arrives; joined once when it is all in
        self.version = version
        self.keep_alive = keep_alive
        self.arrived = arrived  # time.monotonic() when the headers were in
        self.early: Response | None = None  # head()'s answer: the body is read and dropped
        self.body_size = 0
        self.body_done = False
        self.dispatched = False
        self.context = None  # the handler's own, set in head()


class Response(NamedTuple):
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    close: bool = False  # close the connection after this answer


class Later(NamedTuple):
    """An answer still being computed: finish(future) gives the Response once future is done."""

    future: asyncio.Future
    finish: Callable[[asyncio.Future], Response]


class Handler(Protocol):
    def head(self, request: Request) -> Response | None:
        """Headers are in: answer now (the body, if any, is read and dropped), or None to read it."""

    def handle(self, request: Request) -> Response | Later:
        """The body is in (only for requests head() did not answer)."""

    def abandon(self, request: Request, status: int, message: str, reason: str) -> Response:
        """The body of a request head() accepted will not complete: 408 (too slow, or the server
        stops), 413 (too large) or 400 (the client went away; the answer is then not sent)."""

    def error_body(self, message: str) -> bytes:
        """The body of an error the server answers itself (bad request line, headers too large)."""


class _Limits(NamedTuple):
    max_body_bytes: int
    header_timeout_s: float | None
    body_timeout_s: float | None
    keep_alive_s: float


class _ParseAbort(Exception):
    """Raised from a parser callback to stop parsing this connection (the answer is written)."""


class HttpConnection(asyncio.Protocol):
    __slots__ = ("server", "handler", "limits", "loop", "transport", "parser", "queue", "reading", "url",
                 "headers", "header_bytes", "since", "idle_since", "closing", "reading_on", "write_paused",
                 "advancing")

    def __init__(self, server: "HttpServer"):
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()  # headers in, not yet answered; the head is answered first
        self.reading: Request | None = None  # the request whose body the parser is reading
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.since: float | None = None  # a request's first byte, until its headers are in
        self.idle_since: float | None = None
        self.closing = False  # answer what is queued, then close
        self.reading_on = True
        self.write_paused: float | None = None  # since when the transport's buffer is past its high-water mark
        self.advancing = False

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.idle_since = time.monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.transport = None
        # requests accepted but never handled: the handler releases what head() took
        for req in self.queue:
            if not req.dispatched and req.early is None:
                req.dispatched = True
                self._abandon(req, 400, "client disconnected before sending the whole body", "disconnected")
        self.queue.clear()
        self.reading = None

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        try:
            self.parser.feed_data(data)
        except _ParseAbort:
            pass
        except httptools.HttpParserUpgrade:
            # the upgrade is ignored (RFC 9110 lets a server): the request is answered as plain
            # HTTP/1.1, and since the parser reads nothing after an upgrade, the connection then closes
            self.closing = True
            if self.transport is not None:
                self.transport.pause_reading()
                if not self.queue:
                    self._close_now()
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # ---- parser callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.header_bytes = 0
        self.since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        self.headers[name.lower()] = value

    def _count_header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fail(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
            raise _ParseAbort

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        self.since = None
        if version not in ("1.1", "1.0"):
            self._fail(505, "HTTP version not supported; use HTTP/1.0 or HTTP/1.1")
            raise _ParseAbort
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._fail(400, "malformed request target")
            raise _ParseAbort from None
        headers = self.headers
        # after an Upgrade the parser reads no more: answer this one and close
        keep_alive = parser.should_keep_alive() and not self.closing and not parser.should_upgrade()
        req = Request(parser.get_method().decode("latin-1"), url.path.decode("latin-1"), url.query or b"",
                      headers, version, keep_alive, time.monotonic())
        self.reading = req
        self.queue.append(req)
        self._flow()
        early = self.handler.head(req)
        if early is not None:
            req.early = early
            length = headers.get(b"content-length")
            if (length is not None and (not length.isdigit() or int(length) > DISCARD_BODY_BYTES)) or \
                    headers.get(b"transfer-encoding") is not None:
                req.keep_alive = False  # not worth reading to keep the connection
            self._advance()
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            self._abandon_reading(413, f"request body of {int(length)} bytes exceeds the limit of "
                                       f"{self.limits.max_body_bytes} bytes", "body_too_large")
            raise _ParseAbort
        # only at the head of the queue: before the answers ahead of it, it would break their order (a
        # client that waits in vain sends the body after its own timeout anyway)
        if headers.get(b"expect", b"").lower() == b"100-continue" and self.queue[0] is req:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self.reading
        if req.early is not None:
            return  # answered already; the body is dropped
        req.body_size += len(body)
        if req.body_size > self.limits.max_body_bytes:
            self._abandon_reading(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes",
                                  "body_too_large")
            raise _ParseAbort
        req.chunks.append(body)

    def on_message_complete(self) -> None:
        req = self.reading
        self.reading = None
        chunks = req.chunks
        if chunks:
            req.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            req.chunks = []
        req.body_done = True
        self._advance()

    # ---- answering -------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        req.dispatched = True
        try:
            result = self.handler.handle(req)
        except Exception:  # the handler's own bug: a 500, and the server stays up
            log.exception("handler failed on %s %s", req.method, req.path)
            result = self._error(500, "internal server error")
        if isinstance(result, Later):
            result.future.add_done_callback(lambda fut: self._finish_later(req, result.finish, fut))
        else:
            self._respond(req, result)

    def _finish_later(self, req: Request, finish, fut: asyncio.Future) -> None:
        try:
            response = finish(fut)
        except Exception:
            log.exception("handler failed on %s %s", req.method, req.path)
            response = self._error(500, "internal server error")
        self._respond(req, response)

    def _advance(self) -> None:
        """Answer or start the requests at the head of the queue, in order, while answers flow out.

        A loop, not recursion: a client may pipeline thousands of requests that are answered at
        once (head()'s refusals, health checks) in one read."""
        if self.advancing:  # a synchronous answer inside the loop below: the loop goes on
            return
        self.advancing = True
        try:
            queue = self.queue
            while queue and self.transport is not None and self.write_paused is None:
                req = queue[0]
                if req.dispatched:  # in the handler: its answer calls back here
                    break
                if req.early is not None:
                    req.dispatched = True
                    self._write(req, req.early)
                elif req.body_done:
                    self._dispatch(req)
                else:  # its body is still arriving
                    break
            if not queue and self.transport is not None:
                self.idle_since = time.monotonic()
        finally:
            self.advancing = False

    def _respond(self, req: Request, response: Response) -> None:
        self._write(req, response)
        self._advance()

    def _write(self, req: Request, response: Response) -> None:
        transport = self.transport
        if transport is None:  # the client went away: nobody to answer
            return
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        close = response.close or not req.keep_alive or self.closing
        transport.write(encode_response(response, head_only=req.method == "HEAD", close=close,
                                        date=self.server.date))
        if close:
            transport.close()
            self.transport = None
            self.server.connections.discard(self)
            return
        self._flow()

    def _flow(self) -> None:
        """Read more only while answers flow out and few requests wait: a client that pipelines and
        never reads holds one answer past the transport's high-water mark, not all of them."""
        transport = self.transport
        if transport is None or self.closing:  # closing pauses reading for good itself
            return
        want = self.write_paused is None and len(self.queue) <= MAX_PIPELINED
        if want != self.reading_on:
            self.reading_on = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = time.monotonic()
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = None
        self._flow()
        self._advance()

    def _error(self, status: int, message: str) -> Response:
        """An error the server answers itself, in the handler's error format."""
        return Response(status, self.handler.error_body(message), _JSON)

    def _abandon(self, req: Request, status: int, message: str, reason: str) -> Response:
        try:
            return self.handler.abandon(req, status, message, reason)
        except Exception:
            log.exception("handler failed abandoning %s %s", req.method, req.path)
            return self._error(status, message)

    def _abandon_reading(self, status: int, message: str, reason: str) -> None:
        """The request being read cannot complete: answer it (after those before it) and close."""
        req = self.reading
        self.reading = None
        response = self._abandon(req, status, message, reason)
        req.keep_alive = False
        # the requests before it are still being answered: they keep their turn, then this, then close
        req.early = response._replace(close=True)
        req.dispatched = False
        self._advance()
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _fail(self, status: int, message: str) -> None:
        """A request the parser refused, or one whose headers never completed: answer and close."""
        if self.transport is None:
            return
        if self.reading is not None and not self.reading.dispatched and self.reading.early is None:
            self._abandon_reading(400, message, "bad_request")
            return
        if self.queue:  # answers in flight before it keep their turn; nothing after them is read
            self.closing = True
            self.transport.pause_reading()
            return
        self.transport.write(encode_response(self._error(status, message), head_only=False, close=True,
                                             date=self.server.date))
        self.transport.close()
        self.transport = None
        self.server.connections.discard(self)

    # ---- time limits and stopping ------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Close what overstayed: an idle keep-alive connection, slow headers (408), a slow body (408)."""
        lim = self.limits
        if self.transport is None:
            return
        if self.idle_since is not None and not self.queue and now - self.idle_since > lim.keep_alive_s:
            self._close_now()
        elif (self.write_paused is not None and lim.body_timeout_s is not None
              and now - self.write_paused > lim.body_timeout_s):
            # a client that stopped reading its answers holds their memory: it gets the body's time limit
            log.warning("dropping a connection whose client read no answer for %g s", lim.body_timeout_s)
            self.abort()
        elif self.since is not None and lim.header_timeout_s is not None and now - self.since > lim.header_timeout_s:
            self._fail(408, f"the request headers did not arrive within {lim.header_timeout_s:g} s")
        elif (self.reading is not None and lim.body_timeout_s is not None
              and now - self.reading.arrived > lim.body_timeout_s):
            if self.reading.early is not None:  # answered already; only its body is late
                self.closing = True
                self.reading = None
                if not self.queue or self.queue[-1].dispatched:
                    self._close_now()
                return
            self._abandon_reading(408, f"the request body did not arrive within {lim.body_timeout_s:g} s",
                                  "body_timeout")

    def stop(self) -> None:
        """The server stops: answer what has been read, cut uploads short (408), read nothing more."""
        if self.transport is None:
            return
        self.closing = True
        if self.reading is not None and self.reading.early is None and not self.reading.dispatched:
            self._abandon_reading(408, "the request body did not arrive before the server stopped", "body_timeout")
        elif not self.queue:
            self._close_now()
        else:
            self.transport.pause_reading()

    def _close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
            self.server.connections.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
            self.server.connections.discard(self)


def encode_response(response: Response, *, head_only: bool, close: bool, date: bytes) -> bytes:
    status, body, headers, _ = response
    parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode(), b"date: ", date, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"content-length: ", str(len(body)).encode(), b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


class HttpServer:
    """Listen, serve connections with HttpConnection, and stop gracefully."""

    def __init__(self, handler: Handler, *, max_body_bytes: int, body_timeout_s: float | None,
                 header_timeout_s: float | None = None, keep_alive_s: float = KEEP_ALIVE_S):
        self.handler = handler
        # headers get the body's limit unless told: a client slow in either holds a connection the same way
        self.limits = _Limits(max_body_bytes, header_timeout_s if header_timeout_s is not None else body_timeout_s,
                              body_timeout_s, keep_alive_s)
        self.connections: set[HttpConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.date = formatdate(usegmt=True).encode()
        self._listener: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def listen(self, host: str, port: int) -> None:
        """Bind and accept; raises OSError (port in use) before anything is served."""
        self.loop = asyncio.get_running_loop()
        self._listener = await self.loop.create_server(lambda: HttpConnection(self), host, port, backlog=2048)
        self._sweeper = self.loop.create_task(self._sweep(), name="http-timeouts")

    @property
    def port(self) -> int:
        return self._listener.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        # one task for every connection's timeouts instead of a timer per request (armed and
        # cancelled on each one); a late client is cut within a quarter of its limit, at most 1 s
        timeouts = [t for t in (self.limits.header_timeout_s, self.limits.body_timeout_s, self.limits.keep_alive_s)
                    if t is not None]
        interval = min(1.0, max(0.02, min(timeouts) / 4))
        while True:
            await asyncio.sleep(interval)
            self.date = formatdate(usegmt=True).encode()
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop listening, answer the requests already read (uploads still arriving get 408), close
        idle connections, and wait at most timeout_s for the rest before cutting them off."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            conn.stop()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("closing a connection still open %.1f s after the stop began", timeout_s)
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._listener is not None:
            await self._listener.wait_closed()
