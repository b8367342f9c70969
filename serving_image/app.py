"""The HTTP face of the server: Open Inference Protocol v2 routes over one model.

Routes stay thin; parsing and validation live in protocol.py, batching in
batcher.py, engines in backends.py, config reload in config_watch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.responses import Response

from optimodel.artifact import Manifest
from optimodel.batching import BatchingConfig
from serving_image import protocol
from serving_image.backends import Backend, warm_up, warmup_sizes
from serving_image.batcher import Batcher, BatcherClosed, EngineError, QueueFull
from serving_image.config_watch import ConfigWatcher
from serving_image.metrics import ServerMetrics

log = logging.getLogger("serving_image")

SERVER_NAME = "optimodel"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
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
               watch_interval: float = 0.2, on_ready: Callable[[], None] | None = None,
               on_warmup_failed: Callable[[str], None] | None = None) -> "InferFastPath":
    name = model_name or manifest.model_name
    metrics = ServerMetrics(name, manifest.arch)
    # each architecture serves its own engine, so the tuner gives each its own window
    arch = manifest.arch
    batcher = Batcher(backend.run, config.for_arch(arch), engine_max_batch=backend.max_batch_size, metrics=metrics)
    model_io = protocol.ModelIO(name, manifest.inputs, manifest.outputs, allow_non_finite=allow_non_finite)
    state = ServerState()
    watcher = ConfigWatcher(config_path, lambda c: batcher.update_config(c.for_arch(arch)), current=config,
                            interval=watch_interval) if config_path else None

    async def warm() -> None:
        sizes = warmup_sizes(backend.max_batch_size)
        t0 = time.monotonic()
        try:
            await batcher.run_in_engine(warm_up, backend, sizes)
        except Exception as exc:  # not ready forever beats serving an engine that fails
            state.warmup_error = f"warm-up failed: {exc}"
            log.error("%s", state.warmup_error)
            if on_warmup_failed is not None:
                on_warmup_failed(state.warmup_error)
            return
        state.warmed_sizes = sizes
        state.ready = True
        log.info("warmed up batch sizes %s in %.2fs", sizes, time.monotonic() - t0)
        if on_ready is not None:
            on_ready()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
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
            await batcher.close()  # every accepted request is answered before exit
            backend.close()

    app = FastAPI(title="optimodel serving", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.server_state = state
    app.state.watcher = watcher
    app.state.model_name = name

    def is_ready() -> bool:
        return state.ready and not state.draining

    def model_metadata() -> dict:
        return {"name": name, "versions": ["1"], "platform": backend.platform,
                "inputs": protocol.tensor_metadata(manifest.inputs),
                "outputs": protocol.tensor_metadata(manifest.outputs),
                "parameters": {"arch": manifest.arch, "precision": manifest.engine.precision,
                               "max_batch_size": batcher.config.max_batch_size,
                               "max_wait_ms": batcher.config.max_wait_ms}}

    def unknown(model: str) -> Response:
        return _error(404, f"unknown model '{model}'; this server serves '{name}'")

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
    async def metadata(model: str, version: str = "1"):
        if model != name:
            return unknown(model)
        return model_metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "1"):
        if model != name:
            return unknown(model)
        return Response(status_code=200 if is_ready() else 503)

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    async def infer(model: str, headers: dict[bytes, bytes], receive) -> tuple[int, bytes, list]:
        """(status, body, extra headers) for one infer request; every failure is a v2 error body."""
        t0 = time.monotonic()
        if model != name:
            return 404, protocol.error_body(f"unknown model '{model}'; this server serves '{name}'"), []
        if not state.ready:
            metrics.rejected("not_ready")
            return 503, protocol.error_body(state.warmup_error or "model is not ready (warming up)"), RETRY
        metrics.inflight.inc()
        try:
            body = await read_asgi_body(receive, headers.get(b"content-length"), max_body_bytes)
            encoding = headers.get(b"content-encoding")
            if encoding:
                body = protocol.decode_body(body, encoding.decode("latin-1"), max_body_bytes)
            req = protocol.parse_infer_request(body, headers.get(b"inference-header-content-length"), model_io,
                                               batcher.config.max_batch_size)
            results = await batcher.submit(req.inputs, req.batch)
            payload, header_length = protocol.encode_infer_response(name, req, results)
        except protocol.ProtocolError as exc:
            if exc.status == 413:
                metrics.rejected(exc.reason)
            else:
                metrics.error(exc.reason)
            return exc.status, protocol.error_body(str(exc)), []
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

    return InferFastPath(app, infer)


RETRY = [(b"content-type", b"application/json"), (b"retry-after", b"1")]


async def read_asgi_body(receive, content_length: bytes | None, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes without reading all of it."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise protocol.ProtocolError("Content-Length is not an integer") from None
        if declared > limit:
            raise protocol.ProtocolError(f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                         413, "body_too_large")
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

    def __init__(self, app: FastAPI, infer):
        self.app = app
        self.state = app.state
        self._infer = infer

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            parts = scope["path"].split("/")
            # /v2/models/{m}/infer or /v2/models/{m}/versions/{v}/infer
            if parts[-1] == "infer" and parts[1:3] == ["v2", "models"] and (
                    len(parts) == 5 or (len(parts) == 7 and parts[4] == "versions")):
                status, body, headers = await self._infer(unquote(parts[3]), dict(scope["headers"]), receive)
                headers = headers or [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": status,
                            "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
