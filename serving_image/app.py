"""The HTTP face of the server: Open Inference Protocol v2 routes over one model.

ServingApp is what serving_image.http_server calls (head, handle, abandon) and what
runs the model's life (startup: batcher, gRPC, warm-up, config watch; shutdown: every
accepted request answered). Routing is a split of the path, not a framework: nine
routes, one of them hot. Parsing and validation live in protocol.py, batching in
batcher.py, engines in backends.py, config reload in config_watch.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

import orjson

from optimodel.artifact import Manifest
from optimodel.batching import BatchingConfig, batch_size_ladder
from serving_image import protocol
from serving_image.backends import Backend, warm_up
from serving_image.batcher import Batcher, BatcherClosed, EngineError, Overloaded, QueueFull
from serving_image.config_watch import ConfigWatcher
from serving_image.http_server import HttpServer, Later, Request, Response
from serving_image.metrics import ServerMetrics

log = logging.getLogger("serving_image")

SERVER_NAME = "optimodel"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# A request that cannot be answered within this long is refused at once (503 + Retry-After)
# when no p99 SLO is given: answering later helps no client that has a timeout.
DEFAULT_DEADLINE_S = 2.0
# Time allowed to receive a whole request (headers, then body); a client that stalls mid-upload
# is answered 408 and let go instead of holding a connection (and the drain).
DEFAULT_BODY_TIMEOUT_S = 10.0
MODEL_VERSION = "1"
JSON_HEADERS = ((b"content-type", b"application/json"),)
BINARY = b"application/octet-stream"
METHODS_GET = b"GET, HEAD"
_INFER = "infer"  # Request.context of an infer request head() admitted: it holds an inflight count


@dataclass
class ServerState:
    ready: bool = False
    draining: bool = False
    warmup_error: str | None = None
    warmed_sizes: list[int] = field(default_factory=list)


def _error(status: int, message: str, headers=JSON_HEADERS) -> Response:
    return Response(status, protocol.error_body(message), headers)


def _json(doc: dict) -> Response:
    return Response(200, orjson.dumps(doc), JSON_HEADERS)


def create_app(backend: Backend, manifest: Manifest, config: BatchingConfig, *,
               model_name: str | None = None, config_path: Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, allow_non_finite: bool = False,
               deadline_s: float | None = DEFAULT_DEADLINE_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               grpc_port: int | None = None, grpc_host: str = "127.0.0.1", grpc_grace_s: float = 5.0,
               watch_interval: float = 0.2, on_ready: Callable[[], None] | None = None,
               on_warmup_failed: Callable[[str], None] | None = None) -> "ServingApp":
    return ServingApp(backend, manifest, config, model_name=model_name, config_path=config_path,
                      max_body_bytes=max_body_bytes, allow_non_finite=allow_non_finite, deadline_s=deadline_s,
                      body_timeout_s=body_timeout_s, grpc_port=grpc_port, grpc_host=grpc_host,
                      grpc_grace_s=grpc_grace_s, watch_interval=watch_interval, on_ready=on_ready,
                      on_warmup_failed=on_warmup_failed)


class ServingApp:
    """One model behind the v2 routes. head/handle/abandon/error_body make it an http_server.Handler."""

    def __init__(self, backend: Backend, manifest: Manifest, config: BatchingConfig, *,
                 model_name: str | None, config_path: Path | None, max_body_bytes: int, allow_non_finite: bool,
                 deadline_s: float | None, body_timeout_s: float, grpc_port: int | None, grpc_host: str,
                 grpc_grace_s: float, watch_interval: float, on_ready: Callable[[], None] | None,
                 on_warmup_failed: Callable[[str], None] | None):
        self.name = name = model_name or manifest.model_name
        self.backend, self.manifest = backend, manifest
        self.metrics = ServerMetrics(name, manifest.arch)
        # each architecture serves its own engine, so the tuner gives each its own window
        arch = manifest.arch
        self.batcher = Batcher(backend.run, config.for_arch(arch), engine_max_batch=backend.max_batch_size,
                               metrics=self.metrics)
        self.model_io = protocol.ModelIO(name, manifest.inputs, manifest.outputs, allow_non_finite=allow_non_finite)
        self.server_state = ServerState()
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.deadline_s = deadline_s
        self.watcher = ConfigWatcher(config_path, lambda c: self.batcher.update_config(c.for_arch(arch)),
                                     current=config, interval=watch_interval) if config_path else None
        self._on_ready, self._on_warmup_failed = on_ready, on_warmup_failed
        self._grpc_grace_s = grpc_grace_s
        self._tasks: list[asyncio.Task] = []
        self.grpc = None
        if grpc_port is not None:
            from serving_image.grpc_server import GrpcFace, InferenceServicer  # grpcio only when gRPC is on

            self.grpc = GrpcFace(InferenceServicer(
                name=name, version=MODEL_VERSION, model_io=self.model_io, batcher=self.batcher, metrics=self.metrics,
                is_ready=self.is_ready, metadata=self.model_metadata, server_info=self.server_metadata(),
                deadline_s=deadline_s, warmed=lambda: self.server_state.ready), grpc_host, grpc_port, max_body_bytes)

    def http_server(self) -> HttpServer:
        return HttpServer(self, max_body_bytes=self.max_body_bytes, body_timeout_s=self.body_timeout_s)

    # ---- life ------------------------------------------------------------------------

    async def serve(self, server: HttpServer, stop: asyncio.Event, graceful_s: float) -> None:
        """Start the model behind a listening server, serve until stop is set, then stop gracefully:
        the listener closes, what was read is answered (within graceful_s), the batcher drains."""
        await self.startup()
        try:
            await stop.wait()
        finally:
            await server.shutdown(graceful_s)
            await self.shutdown()

    async def startup(self) -> None:
        await self.batcher.start()
        if self.grpc is not None:
            await self.grpc.start()
        self._tasks = [asyncio.create_task(self._warm(), name="warm-up")]
        if self.watcher is not None:
            self._tasks.append(asyncio.create_task(self.watcher.run(), name="config-watch"))

    async def shutdown(self) -> None:
        """Every request the batcher accepted is answered; then the engine is closed."""
        self.server_state.ready = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.grpc is not None:
            # RPCs already in the batcher are answered (the batcher is still running); new ones refused
            await self.grpc.stop(self._grpc_grace_s)
        await self.batcher.close()
        self.backend.close()

    async def _warm(self) -> None:
        state, batcher, backend = self.server_state, self.batcher, self.backend
        sizes = batch_size_ladder(backend.max_batch_size)  # the sizes the build profiled
        t0 = time.monotonic()
        try:
            times = await batcher.run_in_engine(warm_up, backend, sizes)
        except Exception as exc:  # not ready forever beats serving an engine that fails
            state.warmup_error = f"warm-up failed: {exc}"
            log.error("%s", state.warmup_error)
            if self._on_warmup_failed is not None:
                self._on_warmup_failed(state.warmup_error)
            return
        state.warmed_sizes = sizes
        if times:  # admission by time has an estimate before the first real batch
            batcher.batch_seconds = times[-1]
        state.ready = True
        log.info("warmed up batch sizes %s in %.2fs", sizes, time.monotonic() - t0)
        if self._on_ready is not None:
            self._on_ready()

    def is_ready(self) -> bool:
        return self.server_state.ready and not self.server_state.draining

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}

    def model_metadata(self) -> dict:
        m, cfg = self.manifest, self.batcher.config
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": self.backend.platform,
                "inputs": protocol.tensor_metadata(m.inputs), "outputs": protocol.tensor_metadata(m.outputs),
                "parameters": {"arch": m.arch, "precision": m.engine.precision,
                               "max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms}}

    # ---- routes (http_server.Handler) ----------------------------------------------------

    def error_body(self, message: str) -> bytes:
        return protocol.error_body(message)

    def head(self, req: Request) -> Response | None:
        """Route on the request line; answer everything but an admitted infer before its body."""
        parts = req.path.split("/")
        n = len(parts)
        # /v2/models/{m}/infer or /v2/models/{m}/versions/{v}/infer
        if parts[-1] == "infer" and n in (5, 7) and parts[1] == "v2" and parts[2] == "models" and \
                (n == 5 or parts[4] == "versions"):
            if req.method != "POST":
                return _error(405, f"method {req.method} is not allowed on /infer; use POST",
                              (*JSON_HEADERS, (b"allow", b"POST")))
            return self._admit(req, unquote(parts[3]), unquote(parts[5]) if n == 7 else MODEL_VERSION)
        answer = self._get_route(parts)
        if answer is None:
            return _error(404, f"no route for {req.path}")
        if req.method not in ("GET", "HEAD"):
            return _error(405, f"method {req.method} is not allowed on {req.path}; use GET",
                          (*JSON_HEADERS, (b"allow", METHODS_GET)))
        return answer()

    def _get_route(self, parts: list[str]) -> Callable[[], Response] | None:
        n = len(parts)
        if n < 2 or parts[0] or parts[1] not in ("v2", "metrics"):
            return None
        if parts[1] == "metrics":
            return self._metrics if n == 2 else None
        if n == 2:
            return lambda: _json(self.server_metadata())
        if n == 4 and parts[2] == "health" and parts[3] in ("live", "ready"):
            return (lambda: Response(200)) if parts[3] == "live" else \
                (lambda: Response(200 if self.is_ready() else 503))
        if parts[2] != "models" or n < 4:
            return None
        model = unquote(parts[3])
        if n in (6, 7) and parts[4] == "versions":
            version, rest = unquote(parts[5]), parts[6:]
        elif n in (4, 5):
            version, rest = MODEL_VERSION, parts[4:]
        else:
            return None
        if rest not in ([], ["ready"]):
            return None
        unknown = self._unknown(model, version)
        if unknown is not None:
            return lambda: unknown
        if rest:
            return lambda: Response(200 if self.is_ready() else 503)
        return lambda: _json(self.model_metadata())

    def _metrics(self) -> Response:
        body, ctype = self.metrics.exposition()
        return Response(200, body, ((b"content-type", ctype.encode()),))

    def _unknown(self, model: str, version: str) -> Response | None:
        """The 404 for a model or version this server does not serve, else None."""
        if model != self.name:
            return _error(404, f"unknown model '{model}'; this server serves '{self.name}'")
        if version != MODEL_VERSION:
            return _error(404, f"unknown version '{version}' of model '{self.name}'; versions: {MODEL_VERSION}")
        return None

    def _admit(self, req: Request, model: str, version: str) -> Response | None:
        """Refuse an infer request before its body is read when it cannot be served (refusals cost no
        parsing); an admitted one counts as in flight until it is answered or abandoned."""
        unknown = self._unknown(model, version)
        if unknown is not None:
            return unknown
        metrics = self.metrics
        if not self.server_state.ready:
            metrics.rejected("not_ready")
            return _error(503, self.server_state.warmup_error or "model is not ready (warming up)", RETRY)
        try:
            self.batcher.admit(self.deadline_s, since=req.arrived)
        except Overloaded as exc:
            metrics.rejected("deadline")
            return _error(503, str(exc), retry_headers(exc.retry_after))
        metrics.inflight.inc()
        req.context = _INFER
        return None

    def handle(self, req: Request) -> Response | Later:
        """An admitted infer request with its body: parse, queue, and answer when the batch is done."""
        headers = req.headers
        try:
            body = req.body
            encoding = headers.get(b"content-encoding")
            if encoding:
                body = protocol.decode_body(body, encoding.decode("latin-1"), self.max_body_bytes)
            parsed = protocol.parse_infer_request(body, headers.get(b"inference-header-content-length"),
                                                  self.model_io, self.batcher.config.max_batch_size)
            fut = self.batcher.submit(parsed.inputs, parsed.batch, self.deadline_s, since=req.arrived)
        except RecursionError:  # a hostile nesting depth deeper than any check anticipated
            return self._failed(protocol.ProtocolError("the request is nested too deeply"))
        except Exception as exc:
            return self._failed(exc)
        return Later(fut, lambda f: self._answer(req, parsed, f))

    def _answer(self, req: Request, parsed: protocol.InferRequest, fut: asyncio.Future) -> Response:
        exc = fut.exception() if not fut.cancelled() else BatcherClosed("the server is shutting down")
        if exc is not None:
            return self._failed(exc)
        try:
            payload, header_length = protocol.encode_infer_response(self.name, parsed, fut.result())
        except protocol.ProtocolError as exc:
            return self._failed(exc)
        metrics = self.metrics
        metrics.inflight.dec()
        metrics.latency.observe(time.monotonic() - req.arrived)
        if header_length is None:
            return Response(200, payload, JSON_HEADERS)
        return Response(200, payload, ((b"content-type", BINARY),
                                       (b"inference-header-content-length", str(header_length).encode())))

    def _failed(self, exc: BaseException) -> Response:
        """The answer to an admitted infer request that failed; every failure is a v2 error body."""
        metrics = self.metrics
        metrics.inflight.dec()
        if isinstance(exc, protocol.ProtocolError):
            if exc.status == 413:
                metrics.rejected(exc.reason)
            else:
                metrics.error(exc.reason)
            return _error(exc.status, str(exc))
        if isinstance(exc, Overloaded):
            metrics.rejected("deadline")
            return _error(503, str(exc), retry_headers(exc.retry_after))
        if isinstance(exc, QueueFull):
            metrics.rejected("queue_full")
            return _error(503, str(exc), RETRY)
        if isinstance(exc, BatcherClosed):
            metrics.rejected("shutting_down")
            return _error(503, str(exc), RETRY)
        if isinstance(exc, EngineError):
            return _error(500, str(exc))
        raise exc

    def abandon(self, req: Request, status: int, message: str, reason: str) -> Response:
        if req.context is _INFER:
            return self._failed(protocol.ProtocolError(message, status, reason))
        return _error(status, message)


RETRY = ((b"content-type", b"application/json"), (b"retry-after", b"1"))


def retry_headers(seconds: float) -> tuple:
    """Retry-After is whole seconds (RFC 9110); at least 1 so clients do not spin."""
    return ((b"content-type", b"application/json"), (b"retry-after", str(max(1, math.ceil(seconds))).encode()))
