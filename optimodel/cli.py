"""The `optimodel` command: run a manifest locally, validate manifests, print the CRD.

Exit codes: 0 success, 1 build failed or manifest invalid, 2 usage error,
3 the server could not start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from optimodel import __version__
from optimodel.manifest import ManifestError, load_manifests

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


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


def cmd_run(args: argparse.Namespace) -> int:
    from optimodel_local.command import run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from optimodel_local.demo.main import run_demo

    return run_demo(args)


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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check manifests offline; prints field-level errors")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the OptimizedModel CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("demo", help="build the digits CNN (pruned, INT8, gated), serve it under a stepped load "
                                    "with the tuner on, report; then serve until Ctrl-C")
    from optimodel_local.demo.args import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
