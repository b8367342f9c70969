"""The `optimodel` command: run a manifest locally, validate manifests, print the CRD.

Exit codes: 0 success, 1 build failed or manifest invalid, 2 usage error,
3 the server could not start.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from optimodel import __version__
from optimodel.manifest import ManifestError, load_manifests

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO_ROOT / "examples" / "digits-cnn.yaml"


def cmd_crd(args: argparse.Namespace) -> int:
    from optimodel.crd import crd_yaml

    text = crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            models = load_manifests(Path(path))
        except ManifestError as exc:
            failed = True
            console.print(f"[red]✗[/] {path}")
            for err in exc.errors:
                console.print(f"    {err}", markup=False)
            continue
        names = ", ".join(m.metadata.name for m in models)
        out.print(f"[green]✓[/] {path}: {names}")
    return 1 if failed else 0


def _load_one(path: Path):
    models = load_manifests(path)
    if len(models) != 1:
        raise ManifestError(str(path), [])
    return models[0]


def cmd_run(args: argparse.Namespace) -> int:
    from optimodel import local_run

    manifest = Path(args.manifest)
    try:
        model = _load_one(manifest)
    except ManifestError as exc:
        console.print(f"[red]invalid manifest[/] {exc.source}")
        for err in exc.errors or ["expected exactly one OptimizedModel"]:
            console.print(f"    {err}", markup=False)
        return 1
    spec = model.spec
    gpu = spec.targets.gpu_architectures
    if gpu != "auto" and gpu:
        console.print(f"note: GPU targets {gpu} are built in a cluster on nodes of that architecture; "
                      "a local run builds and serves the CPU engine (ONNX Runtime)")
    store = Path(args.store)
    try:
        request = local_run.plan_build(model, manifest.resolve().parent, store)
        console.print(f"building {model.metadata.name} for cpu into {request.artifact_uri}")
        build = local_run.run_build(request, store / ".requests")
        console.print(f"[green]build ok[/]: {local_run.summary(build)}")
        if args.build_only:
            out.print(f"artifact: {build.artifact_dir}")
            return 0
        proc = local_run.start_server(model, build, store, args.host, args.port)
        base = f"http://{args.host}:{args.port}"
        try:
            local_run.wait_ready(proc, base)
            out.print(f"Serving {model.metadata.name} at {base}/v2/models/{model.metadata.name}/infer", soft_wrap=True)
            sys.stdout.flush()
            tuner = _start_tuner(args, model, build, store, base)
            try:
                if args.on_ready:
                    return args.on_ready(model, base)
                _wait_for_signal(proc)
            finally:
                if tuner is not None:
                    tuner[1].set()
                    tuner[0].join(timeout=10)
        finally:
            local_run.stop_server(proc)
    except local_run.LocalRunError as exc:
        console.print(f"[red]error[/]: {exc}", markup=True)
        return exc.exit_code
    return 0


def _start_tuner(args: argparse.Namespace, model, build, store: Path, base: str):
    """With autotune on, tune the window live (thread, event) from /metrics or --prometheus."""
    auto = model.spec.serving.batching.autotune
    if not auto.enabled:
        if getattr(args, "prometheus", None):
            console.print("note: --prometheus is ignored: serving.batching.autotune.enabled is false")
        return None
    from optimodel.tuning import local as tuning
    from optimodel.tuning.model import EngineProfile
    from optimodel.tuning.policy import Bounds

    interval = float(getattr(args, "tune_interval", None) or auto.interval_seconds)
    try:
        profile = EngineProfile.from_file(build.artifact_dir / "report.json")
    except (OSError, ValueError) as exc:
        console.print(f"note: no latency profile ({exc}); the tuner holds the window", markup=False)
        profile = None
    prom = getattr(args, "prometheus", None)
    source = tuning.make_source(base, model.metadata.name, model.metadata.namespace or "default", "cpu",
                                auto.p99_latency_ms, interval, prom)
    config_file = store / build.request.namespace / build.request.model_name / "batching.json"
    tuner = tuning.LocalTuner(source, config_file, profile, Bounds.from_serving(model.spec.serving),
                              echo=lambda line: (out.print(line, markup=False), sys.stdout.flush()))
    console.print(f"tuning max_wait_ms every {interval:g}s to p99 ≤ {auto.p99_latency_ms:g} ms from "
                  f"{prom or base + '/metrics'}", markup=False)
    return tuner.start(interval)


def _wait_for_signal(proc: subprocess.Popen) -> None:
    """Serve until Ctrl-C or SIGTERM, then let the caller drain the server."""
    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        proc.wait()
    except KeyboardInterrupt:
        console.print("stopping: draining the server")
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the digits example if needed, run it, and check one request against ONNX Runtime."""
    subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "make_digits.py")], check=True)

    def check(model, base_url: str) -> int:
        from optimodel.demo_check import compare_with_onnxruntime

        ok = compare_with_onnxruntime(model, base_url, REPO_ROOT / "examples" / "build", out)
        if not ok:
            return 1
        if args.once:
            return 0
        out.print("Press Ctrl-C to stop.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            signal.pause()
        except KeyboardInterrupt:
            console.print("stopping: draining the server")
        return 0

    ns = argparse.Namespace(manifest=str(DEMO_MANIFEST), store=args.store, host=args.host, port=args.port,
                            build_only=False, on_ready=check)
    return cmd_run(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimodel", description="Optimized inference deployments for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"optimodel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="build a manifest's model locally and serve it on 127.0.0.1")
    p.add_argument("manifest", help="OptimizedModel YAML file")
    p.add_argument("--store", default=".optimodel", help="local artifact store (default ./.optimodel)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--build-only", action="store_true", help="build (or reuse) the engine and exit")
    p.add_argument("--prometheus", metavar="URL",
                   help="with autotune on, read observations from this Prometheus instead of the server's /metrics")
    p.add_argument("--tune-interval", type=float, metavar="SECONDS",
                   help="seconds between tuning decisions (default: the manifest's intervalSeconds)")
    p.set_defaults(func=cmd_run, on_ready=None)

    p = sub.add_parser("validate", help="check manifests offline; prints field-level errors")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the OptimizedModel CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("demo", help="train the digits example, serve it, and check a request")
    p.add_argument("--store", default=".optimodel")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--once", action="store_true", help="exit after the check instead of serving")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
