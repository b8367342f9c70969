"""The Open Inference Protocol's gRPC face (inference.GRPCInferenceService) on a second port.

It runs on the REST server's event loop and shares its batcher, metrics, readiness and
drain: a gRPC request and a REST request can share one engine call. Parsing is here
(protobuf in, the same validated arrays the REST parser makes out); the checks on a
tensor (names, datatype, shape, batch limit, NaN/Inf) are protocol.py's.

Stubs: grpc_v2/ holds the .proto (written here, wire-compatible with the OIP
specification) and the Python modules generated from it (`make grpc-stubs`), committed
so the serving image needs no protoc. Probes use the standard gRPC health service
(grpc.health.v1): SERVING once warmed up, NOT_SERVING from SIGTERM on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving_image import protocol
from serving_image.batcher import Batcher, BatcherClosed, EngineError, Overloaded, QueueFull
from serving_image.grpc_v2 import grpc_predict_v2_pb2 as pb
from serving_image.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("serving_image")

# InferTensorContents field per v2 datatype, for requests that do not use raw_input_contents
_CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                   "INT32": "int_contents", "INT16": "int_contents", "INT8": "int_contents",
                   "UINT64": "uint64_contents", "UINT32": "uint_contents", "UINT16": "uint_contents",
                   "UINT8": "uint_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents"}

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
           408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
           415: grpc.StatusCode.INVALID_ARGUMENT}


def _input_array(item, raw: bytes | None, spec, max_batch: int) -> np.ndarray:
    name = item.name
    want = protocol.V2_DATATYPE[spec.dtype]
    if item.datatype != want:
        raise protocol.ProtocolError(f"input '{name}': datatype {item.datatype!r} does not match the model's {want}")
    dtype = protocol.NUMPY_DTYPE[want]
    shape = protocol._check_shape(name, list(item.shape), spec, max_batch)
    count = math.prod(shape)
    if raw is not None:
        if dtype.kind == "O":
            return protocol.decode_bytes_tensor(raw, count, name).reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise protocol.ProtocolError(f"input '{name}': {len(raw)} bytes of raw contents, shape {list(shape)} "
                                         f"of {want} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(item.contents, _CONTENTS_FIELD[want])
    if len(values) != count:
        raise protocol.ProtocolError(f"input '{name}': contents hold {len(values)} elements, shape {list(shape)} "
                                     f"needs {count}")
    if dtype.kind == "O":
        arr = np.empty(count, dtype=object)
        arr[:] = [protocol._utf8(v, name) for v in values]
        return arr.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def parse_grpc_request(req: pb.ModelInferRequest, model: protocol.ModelIO, max_batch: int) -> protocol.InferRequest:
    """Validate a ModelInferRequest into the arrays the batcher takes (the REST parser's twin)."""
    raws = list(req.raw_input_contents)
    if raws and len(raws) != len(req.inputs):
        raise protocol.ProtocolError(f"raw_input_contents has {len(raws)} entries for {len(req.inputs)} inputs")
    if not req.inputs:
        raise protocol.ProtocolError("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    batch = None
    for i, item in enumerate(req.inputs):
        spec = model.input(item.name)
        if spec is None:
            expected = ", ".join(t.name for t in model.inputs)
            raise protocol.ProtocolError(f"unknown input '{item.name}'; model '{model.name}' expects: {expected}")
        if item.name in inputs:
            raise protocol.ProtocolError(f"input '{item.name}' is given twice")
        arr = _input_array(item, raws[i] if raws else None, spec, max_batch)
        if arr.dtype.kind == "f" and not model.allow_non_finite and not np.isfinite(arr).all():
            raise protocol.ProtocolError(f"input '{item.name}' contains NaN or Inf, which this model does not accept")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise protocol.ProtocolError(f"input '{item.name}': batch size {arr.shape[0]} differs from the other "
                                         f"inputs' {batch}")
        inputs[item.name] = arr
    missing = [t.name for t in model.inputs if t.name not in inputs]
    if missing:
        raise protocol.ProtocolError(f"missing input(s) {', '.join(missing)} for model '{model.name}'")
    outputs = []
    for item in req.outputs:
        if model.output(item.name) is None:
            expected = ", ".join(t.name for t in model.outputs)
            raise protocol.ProtocolError(f"unknown output '{item.name}'; model '{model.name}' has: {expected}")
        outputs.append((item.name, True))
    if not outputs:
        outputs = [(t.name, True) for t in model.outputs]
    return protocol.InferRequest(id=req.id or None, inputs=inputs, batch=batch or 0, outputs=outputs)


def encode_grpc_response(model_name: str, version: str, request: protocol.InferRequest,
                         results: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """Every output as raw_output_contents (what Triton answers; NaN/Inf travel as they are)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request.id or "")
    for name, _ in request.outputs:
        arr = results[name]
        resp.outputs.add(name=name, datatype=protocol._NP_TO_V2[arr.dtype], shape=list(arr.shape))
        resp.raw_output_contents.append(protocol.encode_bytes_tensor(arr) if arr.dtype.kind == "O"
                                        else np.ascontiguousarray(arr).tobytes())
    return resp


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs over the shared batcher; every refusal is a gRPC status with the REST message."""

    def __init__(self, *, name: str, version: str, model_io: protocol.ModelIO, batcher: Batcher, metrics,
                 is_ready: Callable[[], bool], metadata: Callable[[], dict], server_info: dict,
                 deadline_s: float | None, warmed: Callable[[], bool] | None = None):
        """is_ready: what probes see (false from SIGTERM on); warmed: whether infer is served (true
        through the drain, as REST: requests keep arriving until endpoint removal propagates)."""
        self.name, self.version, self.model_io = name, version, model_io
        self.batcher, self.metrics = batcher, metrics
        self.is_ready, self.metadata, self.server_info = is_ready, metadata, server_info
        self.warmed = warmed or is_ready
        self.deadline_s = deadline_s

    def _known(self, model: str, version: str) -> bool:
        return model == self.name and version in ("", self.version)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.server_info)

    async def ModelReady(self, request, context):
        if not self._known(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}' version "
                                                           f"'{request.version}'; this server serves '{self.name}'")
        return pb.ModelReadyResponse(ready=self.is_ready())

    async def ModelMetadata(self, request, context):
        if not self._known(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}' version "
                                                           f"'{request.version}'; this server serves '{self.name}'")
        meta = self.metadata()
        tensors = lambda ts: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in ts]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelInfer(self, request, context):
        status, message, retry = await self._infer(request)
        if isinstance(status, pb.ModelInferResponse):
            return status
        if retry is not None:
            context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(retry)))),))
        await context.abort(status, message)

    async def _infer(self, request):
        """(response, None, None) or (grpc status, message, retry-after seconds or None)."""
        t0 = time.monotonic()
        m = self.metrics
        if not self._known(request.model_name, request.model_version):
            return (grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}' version "
                    f"'{request.model_version}'; this server serves '{self.name}' version {self.version}", None)
        if not self.warmed():
            m.rejected("not_ready")
            return grpc.StatusCode.UNAVAILABLE, "model is not ready", 1.0
        m.inflight.inc()
        try:
            self.batcher.admit(self.deadline_s, since=t0)
            req = parse_grpc_request(request, self.model_io, self.batcher.config.max_batch_size)
            results = await self.batcher.submit(req.inputs, req.batch, self.deadline_s, since=t0)
            resp = encode_grpc_response(self.name, self.version, req, results)
        except protocol.ProtocolError as exc:
            (m.rejected if exc.status == 413 else m.error)(exc.reason)
            return _STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc), None
        except Overloaded as exc:
            m.rejected("deadline")
            return grpc.StatusCode.UNAVAILABLE, str(exc), exc.retry_after
        except QueueFull as exc:
            m.rejected("queue_full")
            return grpc.StatusCode.UNAVAILABLE, str(exc), 1.0
        except BatcherClosed as exc:
            m.rejected("shutting_down")
            return grpc.StatusCode.UNAVAILABLE, str(exc), 1.0
        except EngineError as exc:
            return grpc.StatusCode.INTERNAL, str(exc), None
        except RecursionError:
            m.error("bad_request")
            return grpc.StatusCode.INVALID_ARGUMENT, "the request is nested too deeply", None
        finally:
            m.inflight.dec()
        m.latency.observe(time.monotonic() - t0)
        return resp, None, None


HEALTH_SERVICES = ("", "inference.GRPCInferenceService")


class ReadinessHealth(health.aio.HealthServicer):
    """Check answers from readiness at the moment of the call; Watch streams the mirrored status.

    The mirror polls, so a Check answered from it alone said NOT_SERVING for up to one
    poll after the REST side already said ready.
    """

    def __init__(self, is_ready: Callable[[], bool]):
        super().__init__()
        self._is_ready = is_ready

    async def Check(self, request, context):
        if request.service in HEALTH_SERVICES:
            serving = self._is_ready()
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return await super().Check(request, context)


class GrpcFace:
    """The gRPC server's life: start with the app, mirror readiness into health, stop in the drain."""

    def __init__(self, servicer: InferenceServicer, host: str, port: int, max_message_bytes: int):
        self.servicer = servicer
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.health = ReadinessHealth(servicer.is_ready)
        self.server: grpc.aio.Server | None = None
        self._mirror: asyncio.Task | None = None

    async def start(self) -> None:
        opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self.server.start()
        self._mirror = asyncio.create_task(self._mirror_health(), name="grpc-health")

    async def _mirror_health(self) -> None:
        last = None
        while True:
            serving = self.servicer.is_ready()
            if serving != last:
                status = health_pb2.HealthCheckResponse.SERVING if serving else \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                for service in HEALTH_SERVICES:
                    await self.health.set(service, status)
                last = serving
            await asyncio.sleep(0.1)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, let running ones finish within grace_s (they share the batcher's drain)."""
        if self._mirror is not None:
            self._mirror.cancel()
            await asyncio.gather(self._mirror, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace_s)
