"""`optimodel run`: one manifest built, served and (with autotune) tuned on this machine."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from optimodel.manifest import ManifestError, load_manifests
from optimodel_local import run as local_run

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def load_one(path: Path):
    models = load_manifests(path)
    if len(models) != 1:
        raise ManifestError(str(path), [])
    return models[0]


def run(args: argparse.Namespace) -> int:
    """`optimodel run MANIFEST`: build (or reuse) the engine, serve it, tune it when autotune is on."""
    manifest = Path(args.manifest)
    try:
        model = load_one(manifest)
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
    interval = float(getattr(args, "tune_interval", None) or auto.interval_seconds)
    prom = getattr(args, "prometheus", None)
    tuner = make_tuner(model, build, store, base, interval, prom,
                       echo=lambda line: (out.print(line, markup=False), sys.stdout.flush()))
    console.print(f"tuning max_wait_ms every {interval:g}s to p99 ≤ {auto.p99_latency_ms:g} ms from "
                  f"{prom or base + '/metrics'}", markup=False)
    return tuner.start(interval)


def make_tuner(model, build: local_run.LocalBuild, store: Path, base: str, interval: float,
               prometheus: str | None = None, echo=print):
    """The tuner's local driver for one served model (not started); `optimodel demo` uses it too."""
    from optimodel.tuning import local as tuning
    from optimodel.tuning.model import EngineProfile
    from optimodel.tuning.policy import Bounds

    auto = model.spec.serving.batching.autotune
    try:
        profile = EngineProfile.from_file(build.artifact_dir / "report.json")
    except (OSError, ValueError) as exc:
        console.print(f"note: no latency profile ({exc}); the tuner holds the window", markup=False)
        profile = None
    source = tuning.make_source(base, model.metadata.name, model.metadata.namespace or "default", "cpu",
                                auto.p99_latency_ms, interval, prometheus)
    return tuning.LocalTuner(source, local_run.batching_file(store, build), profile,
                             Bounds.from_serving(model.spec.serving), echo=echo)


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
