"""`python -m serving_image --artifact URI_OR_DIR --config FILE [--host] [--port] [--grpc-port] [--model-name]`.

Refuses to start (non-zero exit, one clear line) when the artifact is missing,
unfinished or fails its checksums. Listens at once so liveness answers, warms every
batch-size bucket, then reports ready and logs "serving <model> on http://HOST:PORT".
SIGTERM: readiness goes false (REST and gRPC health), (after --drain-seconds) the
listener closes, uploads still arriving get 408, every accepted request is answered,
then the process exits 0 — within --grace-seconds whatever clients do.

Exit codes: 0 clean stop, 2 artifact refused (missing, unfinished, checksum), 3 engine
does not load, 4 warm-up failed, 1 the port cannot be bound (in use).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from pathlib import Path

from optimodel.artifact import ArtifactError, open_artifact
from optimodel.batching import BatchingConfig, load_batching_config
from optimodel.storage import StorageError

log = logging.getLogger("serving_image")

DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_DEADLINE_MS = 2000.0
# what the drain leaves for answering accepted requests and closing: the batcher's own
# close (queued requests run) and backend shutdown happen after the HTTP server's graceful stop
CLOSE_MARGIN_S = 2.0
# objects allocated less freed before a young collection (CPython's default 700)
GC_THRESHOLD0 = 20_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving_image", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, help="artifact URI (file://, pvc://, s3://, ...) or local directory")
    p.add_argument("--config", required=True, type=Path, help="batching config JSON (optimodel.batching), watched live")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the Open Inference Protocol over gRPC (with grpc.health.v1) on this port")
    p.add_argument("--model-name", default=None, help="name in the v2 routes (default: the manifest's model name)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--drain-seconds", type=float, default=0.0,
                   help="after SIGTERM, keep serving this long while not ready (endpoint removal propagates)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the container CPU quota less one core for the event loop)")
    p.add_argument("--deadline-ms", type=float, default=None,
                   help="refuse (503 + Retry-After) a request that cannot be answered within this; set it to the "
                        "p99 SLO (default: 2000)")
    p.add_argument("--body-timeout-seconds", type=float, default=10.0,
                   help="answer 408 to a request whose body has not all arrived within this")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="after SIGTERM the process exits within this, whatever clients do (the pod's "
                        "terminationGracePeriodSeconds); requests still open after drain-seconds get the rest")
    p.add_argument("--allow-non-finite", action="store_true", help="accept NaN/Inf in float inputs")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def initial_config(path: Path, manifest_max_batch: int) -> BatchingConfig:
    default = BatchingConfig(max_wait_ms=DEFAULT_MAX_WAIT_MS, max_batch_size=manifest_max_batch)
    if not path.exists():
        log.warning("batching config %s is absent; using maxBatchSize %d (manifest) and maxWaitMs %g until it appears",
                    path, manifest_max_batch, DEFAULT_MAX_WAIT_MS)
        return default
    try:
        return load_batching_config(path)
    except (OSError, ValueError) as exc:
        log.warning("batching config %s is invalid (%s); using defaults %s until it is fixed",
                    path, " ".join(str(exc).split()), json.dumps(default.wire()))
        return default


def graceful_timeout(args: argparse.Namespace) -> float:
    """Seconds the HTTP server waits for open requests once the listener closes, so the whole stop fits the grace period.

    Requests still open then (a client stalled mid-upload, a slow reader) are cancelled:
    the pod would be SIGKILLed at the end of the grace period anyway.
    """
    return max(0.5, args.grace_seconds - args.drain_seconds - CLOSE_MARGIN_S)


def quiet_gc() -> None:
    """Keep the cyclic GC off the hot path once the server is warm.

    Profiled at 2,000 req/s: about a tenth of the event loop's CPU went to gc_collect_main,
    mostly full collections walking the ~10^5 long-lived objects the imports (ONNX Runtime,
    numpy, FastAPI, pydantic, grpc) leave behind. freeze() parks those where no collection
    looks; a larger first threshold makes young collections rarer (requests free their objects
    by reference counting: the cyclic collector finds almost nothing on this path).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, 20, 100)


def _artifact_uri(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        local_dir, manifest = open_artifact(_artifact_uri(args.artifact))
    except (ArtifactError, StorageError) as exc:
        print(f"serving_image: refusing to start: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"serving_image: refusing to start: cannot open artifact {args.artifact}: {exc}", file=sys.stderr)
        return 2

    from serving_image.app import create_app
    from serving_image.backends import load_backend

    try:
        backend = load_backend(local_dir, manifest, threads=args.threads)
    except Exception as exc:  # an engine that does not load is a refusal, not a traceback
        print(f"serving_image: refusing to start: engine {manifest.engine.file} does not load: {exc}", file=sys.stderr)
        return 3
    config = initial_config(args.config, manifest.max_batch_size)
    name = args.model_name or manifest.model_name
    stop: asyncio.Event | None = None

    def on_ready() -> None:
        quiet_gc()
        log.info("serving %s on http://%s:%d%s", name, args.host, args.port,
                 f" and grpc://{args.host}:{args.grpc_port}" if args.grpc_port else "")

    def on_warmup_failed(reason: str) -> None:
        # exit rather than sit unready: a crash-looping pod says what is wrong, a silent one does not
        print(f"serving_image: refusing to serve: {reason}", file=sys.stderr)
        stop.set()

    app = create_app(backend, manifest, config, model_name=name, config_path=args.config,
                     max_body_bytes=args.max_body_bytes, allow_non_finite=args.allow_non_finite, on_ready=on_ready,
                     deadline_s=(args.deadline_ms or DEFAULT_DEADLINE_MS) / 1000.0,
                     grpc_port=args.grpc_port, grpc_host=args.host,
                     # by then the HTTP drain is spent; RPCs in the batcher finish in the margin
                     grpc_grace_s=CLOSE_MARGIN_S / 2,
                     body_timeout_s=args.body_timeout_seconds,
                     on_warmup_failed=on_warmup_failed)
    state = app.server_state

    async def serve() -> int:
        nonlocal stop
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            if state.draining:  # a second SIGTERM: stop now
                stop.set()
                return
            state.draining = True
            log.info("SIGTERM: not ready; draining accepted requests")
            loop.call_later(args.drain_seconds, stop.set)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        server = app.http_server()
        try:
            await server.listen(args.host, args.port)
        except OSError as exc:
            print(f"serving_image: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            backend.close()
            return 1
        await app.serve(server, stop, graceful_timeout(args))
        return 0

    rc = run_loop(serve())
    if rc:
        return rc
    if state.warmup_error:
        return 4
    log.info("stopped")
    return 0


def run_loop(main):
    """Run on uvloop (its event loop costs less per request than asyncio's) when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
