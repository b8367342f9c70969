"""The HTTP face of the server: Open Inference Protocol v2 routes over one model.

Routes stay thin; parsing and validation live in protocol.py, batching in
batcher.py, engines in backends.py, config reload in config_watch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.responses import Response

from optimodel.artifact import Manifest
from optimodel.batching import BatchingConfig, batch_size_ladder
from serving_image import protocol
from serving_image.backends import Backend, warm_up
from serving_image.batcher import Batcher, BatcherClosed, EngineError, Overloaded, QueueFull
from serving_image.config_watch import ConfigWatcher
from serving_image.metrics import ServerMetrics

log = logging.getLogger("serving_image")

SERVER_NAME = "optimodel"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# A request that cannot be answered within this long is refused at once (503 + Retry-After)
# when no p99 SLO is given: answering later helps no client that has a timeout.
DEFAULT_DEADLINE_S = 2.0
# Time allowed to receive a whole request body once its headers are in; a client that
# stalls mid-upload is answered 408 and let go instead of holding a task (and the drain).
DEFAULT_BODY_TIMEOUT_S = 10.0
MODEL_VERSION = "1"
JSON = "application/json"


@dataclass
class ServerState:
    ready: bool = False
    draining: bool = False
    warmup_error: str | None = None
    warmed_sizes: list[int] = field(default_factory=list)


def _error(status: int, message: str) -> Response:
    return Response(protocol.error_body(message), status_code=status, media_type=JSON)


def create_app(backend: Backend, manifest: Manifest, config: BatchingConfig, *,
               model_name: str | None = None, config_path: Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, allow_non_finite: bool = False,
               deadline_s: float | None = DEFAULT_DEADLINE_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               grpc_port: int | None = None, grpc_host: str = "127.0.0.1", grpc_grace_s: float = 5.0,
               watch_interval: float = 0.2, on_ready: Callable[[], None] | None = None,
               on_warmup_failed: Callable[[str], None] | None = None) -> "InferFastPath":
    name = model_name or manifest.model_name
    metrics = ServerMetrics(name, manifest.arch)
    # each architecture serves its own engine, so the tuner gives each its own window
    arch = manifest.arch
    batcher = Batcher(backend.run, config.for_arch(arch), engine_max_batch=backend.max_batch_size, metrics=metrics)
    model_io = protocol.ModelIO(name, manifest.inputs, manifest.outputs, allow_non_finite=allow_non_finite)
    state = ServerState()
    body_reads = BodyDeadlines(body_timeout_s)  # uploads in progress, cut short when the server stops
    watcher = ConfigWatcher(config_path, lambda c: batcher.update_config(c.for_arch(arch)), current=config,
                            interval=watch_interval) if config_path else None

    async def warm() -> None:
        sizes = batch_size_ladder(backend.max_batch_size)  # the sizes the build profiled
        t0 = time.monotonic()
        try:
            times = await batcher.run_in_engine(warm_up, backend, sizes)
        except Exception as exc:  # not ready forever beats serving an engine that fails
            state.warmup_error = f"warm-up failed: {exc}"
            log.error("%s", state.warmup_error)
            if on_warmup_failed is not None:
                on_warmup_failed(state.warmup_error)
            return
        state.warmed_sizes = sizes
        if times:  # admission by time has an estimate before the first real batch
            batcher.batch_seconds = times[-1]
        state.ready = True
        log.info("warmed up batch sizes %s in %.2fs", sizes, time.monotonic() - t0)
        if on_ready is not None:
            on_ready()

    grpc_face = None
    if grpc_port is not None:
        from serving_image.grpc_server import GrpcFace, InferenceServicer  # grpcio only when gRPC is on

        grpc_face = GrpcFace(InferenceServicer(
            name=name, version=MODEL_VERSION, model_io=model_io, batcher=batcher, metrics=metrics,
            is_ready=lambda: is_ready(), metadata=lambda: model_metadata(),
            server_info={"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]},
            deadline_s=deadline_s, warmed=lambda: state.ready), grpc_host, grpc_port, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if grpc_face is not None:
            await grpc_face.start()
        tasks = [asyncio.create_task(warm(), name="warm-up")]
        if watcher is not None:
            tasks.append(asyncio.create_task(watcher.run(), name="config-watch"))
        try:
            yield
        finally:
            state.ready = False
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if grpc_face is not None:
                # RPCs already in the batcher are answered (the batcher is still running); new ones refused
                await grpc_face.stop(grpc_grace_s)
            await batcher.close()  # every accepted request is answered before exit
            body_reads.stop()
            backend.close()

    app = FastAPI(title="optimodel serving", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.server_state = state
    app.state.watcher = watcher
    app.state.model_name = name
    app.state.grpc = grpc_face

    def is_ready() -> bool:
        return state.ready and not state.draining

    def model_metadata() -> dict:
        return {"name": name, "versions": [MODEL_VERSION], "platform": backend.platform,
                "inputs": protocol.tensor_metadata(manifest.inputs),
                "outputs": protocol.tensor_metadata(manifest.outputs),
                "parameters": {"arch": manifest.arch, "precision": manifest.engine.precision,
                               "max_batch_size": batcher.config.max_batch_size,
                               "max_wait_ms": batcher.config.max_wait_ms}}

    def unknown(model: str, version: str = MODEL_VERSION) -> Response | None:
        """The 404 for a model or version this server does not serve, else None."""
        if model != name:
            return _error(404, f"unknown model '{model}'; this server serves '{name}'")
        if version != MODEL_VERSION:
            return _error(404, f"unknown version '{version}' of model '{name}'; versions: {MODEL_VERSION}")
        return None

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if is_ready() else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: str = MODEL_VERSION):
        return unknown(model, version) or model_metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = MODEL_VERSION):
        return unknown(model, version) or Response(status_code=200 if is_ready() else 503)

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    async def infer(model: str, version: str, headers: dict[bytes, bytes], receive) -> tuple[int, bytes, list]:
        """(status, body, extra headers) for one infer request; every failure is a v2 error body."""
        t0 = time.monotonic()
        if model != name or version != MODEL_VERSION:
            what = f"model '{model}'" if model != name else f"version '{version}' of model '{name}'"
            return 404, protocol.error_body(f"unknown {what}; this server serves '{name}' version "
                                            f"{MODEL_VERSION}"), []
        if not state.ready:
            metrics.rejected("not_ready")
            return 503, protocol.error_body(state.warmup_error or "model is not ready (warming up)"), RETRY
        metrics.inflight.inc()
        try:
            batcher.admit(deadline_s, since=t0)  # before reading the body: a refusal costs no parsing
            body = await read_asgi_body(receive, headers.get(b"content-length"), max_body_bytes, body_reads)
            encoding = headers.get(b"content-encoding")
            if encoding:
                body = protocol.decode_body(body, encoding.decode("latin-1"), max_body_bytes)
            req = protocol.parse_infer_request(body, headers.get(b"inference-header-content-length"), model_io,
                                               batcher.config.max_batch_size)
            results = await batcher.submit(req.inputs, req.batch, deadline_s, since=t0)
            payload, header_length = protocol.encode_infer_response(name, req, results)
        except protocol.ProtocolError as exc:
            if exc.status == 413:
                metrics.rejected(exc.reason)
            else:
                metrics.error(exc.reason)
            return exc.status, protocol.error_body(str(exc)), []
        except Overloaded as exc:
            metrics.rejected("deadline")
            return 503, protocol.error_body(str(exc)), retry_headers(exc.retry_after)
        except QueueFull as exc:
            metrics.rejected("queue_full")
            return 503, protocol.error_body(str(exc)), RETRY
        except BatcherClosed as exc:
            metrics.rejected("shutting_down")
            return 503, protocol.error_body(str(exc)), RETRY
        except EngineError as exc:
            return 500, protocol.error_body(str(exc)), []
        finally:
            metrics.inflight.dec()
        metrics.latency.observe(time.monotonic() - t0)
        if header_length is None:
            return 200, payload, [(b"content-type", b"application/json")]
        return 200, payload, [(b"content-type", b"application/octet-stream"),
                              (b"inference-header-content-length", str(header_length).encode())]

    return InferFastPath(app, infer, body_reads)


RETRY = [(b"content-type", b"application/json"), (b"retry-after", b"1")]


def retry_headers(seconds: float) -> list:
    """Retry-After is whole seconds (RFC 9110); at least 1 so clients do not spin."""
    return [(b"content-type", b"application/json"), (b"retry-after", str(max(1, math.ceil(seconds))).encode())]


class BodyDeadlines:
    """Uploads in progress and when each must have arrived; one sweeper task cuts the late ones.

    One dict entry per request instead of an asyncio.timeout (a timer armed and cancelled, a
    context manager) per request: timed alone, 0.2 us against 8 us. A late upload is cut within
    a quarter of the timeout (at most 1 s) past its deadline. timeout_s None: no deadline.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.reading: dict[asyncio.Task, float] = {}
        self.cut: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._interval = min(1.0, max(0.02, timeout_s / 4)) if timeout_s is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None

    def current_task(self) -> asyncio.Task:
        # asyncio.current_task() without a loop looks the running loop up, a getpid() system call
        # each time on Python 3.11 (1 % of the event loop's samples at 2,000 req/s); the loop is fixed
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return asyncio.current_task(loop)

    def start(self, task: asyncio.Task) -> None:
        if self.timeout_s is None:  # still registered: the drain cuts it
            self.reading[task] = math.inf
            return
        self.reading[task] = time.monotonic() + self.timeout_s
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="body-deadlines")

    def finish(self, task: asyncio.Task) -> bool:
        """Forget the task; True when it was cut (its CancelledError is the timeout's, not a real cancel)."""
        self.reading.pop(task, None)
        if task in self.cut:
            self.cut.discard(task)
            task.uncancel()
            return True
        return False

    def cut_late(self, now: float) -> None:
        for task, deadline in list(self.reading.items()):
            if (deadline <= now or now == math.inf) and task not in self.cut:
                self.cut.add(task)
                task.cancel()

    def cut_all(self) -> None:
        self.cut_late(math.inf)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.cut_late(time.monotonic())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


async def read_asgi_body(receive, content_length: bytes | None, limit: int,
                         deadlines: BodyDeadlines | None = None) -> bytes:
    """The request body, refused with 413 past `limit` bytes without reading all of it,
    and with 408 when it has not all arrived within deadlines.timeout_s (or the server stops
    first: deadlines.cut_all())."""
    if content_length is not None:
        if not content_length.isdigit():
            raise protocol.ProtocolError("Content-Length is not an integer")
        declared = int(content_length)
        if declared > limit:
            raise protocol.ProtocolError(f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                         413, "body_too_large")
    if deadlines is None:
        return await _receive_body(receive, limit)
    task = deadlines.current_task()
    deadlines.start(task)
    try:
        return await _receive_body(receive, limit)
    except asyncio.CancelledError:
        if deadlines.finish(task):
            within = "before the server stopped" if deadlines.timeout_s is None else f"within {deadlines.timeout_s:g} s"
            raise protocol.ProtocolError(f"the request body did not arrive {within}", 408, "body_timeout") from None
        raise
    finally:
        deadlines.finish(task)


async def _receive_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise protocol.ProtocolError("client disconnected before sending the whole body", 400, "disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise protocol.ProtocolError(f"request body exceeds the limit of {limit} bytes", 413, "body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class InferFastPath:
    """POST .../infer handled in raw ASGI, everything else passed on to FastAPI.

    Infer is the one hot route. FastAPI's route matching, dependency solving and
    Request/Response objects cost more CPU per request than the rest of the server
    together (profiled: about half of the event loop's time at batch 1), and on a
    CPU-bound pod that CPU is taken from the engine.
    """

    def __init__(self, app: FastAPI, infer, body_reads: BodyDeadlines):
        self.app = app
        self.state = app.state
        self._infer = infer
        self._body_reads = body_reads

    def cut_body_reads(self) -> None:
        """Answer every upload still in progress 408 now (call in the loop when the listener closes):
        a client stalled mid-body must not hold the drain open."""
        self._body_reads.cut_all()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if scope["http_version"] not in _HTTP_VERSIONS:
                # a request line without a version (HTTP/0.9) has no headers or status line to answer with
                await _send(send, 505, protocol.error_body("HTTP version not supported; use HTTP/1.0 or later"),
                            [(b"content-type", b"application/json"), (b"connection", b"close")])
                return
            parts = scope["path"].split("/")
            # /v2/models/{m}/infer or /v2/models/{m}/versions/{v}/infer
            if parts[-1] == "infer" and parts[1:3] == ["v2", "models"] and (
                    len(parts) == 5 or (len(parts) == 7 and parts[4] == "versions")):
                if scope["method"] != "POST":
                    await _send(send, 405, protocol.error_body(f"method {scope['method']} is not allowed on "
                                                               f"/infer; use POST"),
                                [(b"content-type", b"application/json"), (b"allow", b"POST")])
                    return
                version = unquote(parts[5]) if len(parts) == 7 else MODEL_VERSION
                try:
                    status, body, headers = await self._infer(unquote(parts[3]), version, dict(scope["headers"]),
                                                              receive)
                except RecursionError:  # a hostile nesting depth deeper than any check anticipated
                    self.state.metrics.error("bad_request")
                    status, body, headers = 400, protocol.error_body("the request is nested too deeply"), []
                await _send(send, status, body, headers or [(b"content-type", b"application/json")])
                return
        await self.app(scope, receive, send)


_HTTP_VERSIONS = frozenset(("1.0", "1.1", "2", "2.0"))


async def _send(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
