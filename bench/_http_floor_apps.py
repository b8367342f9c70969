"""Do-nothing HTTP servers for the HTTP stack's floor: read the whole request body, answer a fixed JSON.

Each is what our /infer path would cost with no work of its own, on one HTTP stack:

  uvicorn      raw ASGI app on uvicorn + httptools + uvloop (what serving_image runs on)
  granian-asgi the same ASGI app on granian (Rust HTTP, one worker, one runtime thread)
  granian-rsgi granian's own RSGI interface
  httptools    an asyncio.Protocol feeding httptools' parser directly, on uvloop (no ASGI at all)
  optimodel-http  serving_image.http_server (what serving_image runs on) with a handler that answers at once
  grpc-aio     grpc.aio (what the gRPC port runs on) with a ModelInfer that answers a fixed response at once

Usage: python bench/_http_floor_apps.py KIND PORT   (prints "ready" once listening)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

BODY = b'{"model_name":"mlp","model_version":"1","outputs":[{"name":"y","datatype":"FP32","shape":[1,10],"data":[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0]}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def asgi_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def rsgi_app(scope, proto):
    await proto()  # the whole body
    proto.response_bytes(200, [("content-type", "application/json")], BODY)


class _HttptoolsProtocol(asyncio.Protocol):
    ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)

    def connection_made(self, transport):
        import httptools

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.transport.write(self.ANSWER)


def main(kind: str, port: int) -> None:
    if kind == "uvicorn":
        import uvicorn

        config = uvicorn.Config(asgi_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                access_log=False, log_level="warning", proxy_headers=False, server_header=False,
                                lifespan="off")
        import uvloop

        print("ready", flush=True)  # the caller polls the port
        uvloop.run(uvicorn.Server(config).serve())
    elif kind in ("granian-asgi", "granian-rsgi"):
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        interface = Interfaces.ASGI if kind == "granian-asgi" else Interfaces.RSGI
        target = "asgi_app" if kind == "granian-asgi" else "rsgi_app"
        print("ready", flush=True)  # granian binds in its worker; the caller polls the port
        Server(f"_http_floor_apps:{target}", address="127.0.0.1", port=port, interface=interface, workers=1,
               runtime_threads=1, loop=Loops.uvloop, log_enabled=False, backlog=2048).serve()
    elif kind == "httptools":
        import uvloop

        async def run():
            loop = asyncio.get_running_loop()
            server = await loop.create_server(_HttptoolsProtocol, "127.0.0.1", port, backlog=2048)
            print("ready", flush=True)
            async with server:
                await server.serve_forever()

        uvloop.run(run())
    elif kind == "optimodel-http":
        import uvloop

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from serving_image.http_server import HttpServer, Response

        class Fixed:
            answer = Response(200, BODY, ((b"content-type", b"application/json"),))

            def head(self, request):
                return None

            def handle(self, request):
                return self.answer

            def abandon(self, request, status, message, reason):
                return Response(status, b"{}")

            def error_body(self, message):
                return b"{}"

        async def run():
            server = HttpServer(Fixed(), max_body_bytes=64 << 20, body_timeout_s=10.0)
            await server.listen("127.0.0.1", port)
            print("ready", flush=True)
            await asyncio.Event().wait()

        uvloop.run(run())
    elif kind == "grpc-aio":
        import grpc
        import uvloop

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from serving_image.grpc_v2 import grpc_predict_v2_pb2 as pb

        answer = pb.ModelInferResponse(model_name="mlp", model_version="1")
        answer.outputs.add(name="y", datatype="FP32", shape=[1, 10])
        answer.raw_output_contents.append(bytes(40))
        fixed = answer.SerializeToString()

        async def infer(request: bytes, context) -> bytes:
            pb.ModelInferRequest.FromString(request)  # what any servicer pays: the request parsed
            return fixed

        async def run():
            # the same options as serving_image.grpc_server; bytes in and out, as its stubs do in C
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
            handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
            server.add_generic_rpc_handlers((handler,))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print("ready", flush=True)
            await server.wait_for_termination()

        uvloop.run(run())
    else:
        raise SystemExit(f"unknown kind {kind!r}; use uvicorn, granian-asgi, granian-rsgi, httptools, "
                         f"optimodel-http or grpc-aio")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
