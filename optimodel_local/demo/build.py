"""The demo's first part: the digits data, then two builds of the same CNN by the real builder —
FP32 as exported (the baseline) and the full pipeline (prune + distill, INT8, accuracy gate)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from optimodel.spec import OptimizedModel
from optimodel_local import run as local_run
from optimodel_local.command import load_one
from optimodel_local.demo.children import Children
from optimodel_local.demo.report import fmt_bytes, fmt_macs

BASELINE_MANIFEST = "digits-cnn.yaml"
OPTIMIZED_MANIFEST = "digits-cnn-int8.yaml"
CODE = "digits_cnn.py"
DATA_DIR = "build"          # the manifests name file://./build/...
DATA_DONE = "digits_meta.json"  # make_digits writes it last

# what the builder prints on stderr when it is not on a terminal (builder_job/stagelog.py)
STAGE_START = re.compile(r"^\[builder\] (\w+) …$")
STAGE_END = re.compile(r"^\[builder\] (\w+) (done in|failed after) ([\d.]+)s$")


@dataclass
class Built:
    model: OptimizedModel
    build: local_run.LocalBuild
    report: dict
    seconds: float


def copy_examples(scratch: Path) -> None:
    """The example's manifests and model code, from the installed package into the demo's folder."""
    scratch.mkdir(parents=True, exist_ok=True)
    examples = resources.files("optimodel_examples")
    for name in (BASELINE_MANIFEST, OPTIMIZED_MANIFEST, CODE):
        (scratch / name).write_bytes(examples.joinpath(name).read_bytes())


def make_data(scratch: Path, children: Children, console: Console, reuse: Path | None = None) -> str:
    """Train the CNN on sklearn's digits and write the datasets, unless the folder is already complete.

    Written into a temporary folder renamed into place when complete: an interrupted run leaves nothing
    that a later run would take for finished."""
    target = scratch / DATA_DIR
    if (target / DATA_DONE).exists():
        return f"reusing the model and datasets trained before ({DATA_DIR}/)"
    if target.exists():
        shutil.rmtree(target)  # an incomplete folder from a run of an older version
    tmp = scratch / f".{DATA_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if reuse is not None:
        shutil.copytree(reuse, tmp)
        message = f"copied the trained model and datasets from {reuse}"
    else:
        proc = children.start([sys.executable, "-m", "optimodel_examples.make_digits", "--out", str(tmp)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=local_run.child_env())
        with console.status("training the digits CNN on scikit-learn's 8x8 digits …"):
            output, _ = proc.communicate()
        if proc.returncode != 0:
            raise local_run.LocalRunError(f"making the digits data failed (exit {proc.returncode}):\n{output}")
        message = next((line for line in output.splitlines() if line.startswith("trained")), "trained")
    tmp.rename(target)
    return message


def build(manifest: Path, store: Path, children: Children, console: Console, title: str, log: Path) -> Built:
    """Run the builder for one manifest with a line per stage; its full log goes to `log`."""
    started = time.monotonic()
    model = load_one(manifest)
    request = local_run.plan_build(model, manifest.resolve().parent, store)
    request_file, result_file = local_run.write_request(request, store / ".requests")
    proc = children.start(local_run.builder_command(request_file, result_file), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=local_run.child_env())
    notes: list[str] = []
    progress = Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
                        TextColumn("{task.elapsed:>6.1f}s"), console=console, transient=False)
    console.print(f"[bold]{title}[/]")
    with progress, log.open("a", buffering=1) as sink:  # line by line: the log shows where a build is
        tasks: dict[str, int] = {}
        for line in proc.stderr:
            sink.write(line)
            line = line.rstrip()
            if m := STAGE_START.match(line):
                tasks[m[1]] = progress.add_task(f"  {m[1]:<10}", total=1)
            elif m := STAGE_END.match(line):
                task = tasks.get(m[1])
                if task is not None:
                    ok = m[2] == "done in"
                    progress.update(task, completed=1 if ok else 0,
                                    description=f"  {m[1]:<10}{'' if ok else ' [red]failed[/]'}")
                    progress.stop_task(task)
            elif line.startswith("[builder] cache hit"):
                notes.append("cache hit: built before with the same model, options and toolchain")
        proc.wait()
    for note in notes:
        console.print(f"  {note}", markup=False)
    built = local_run.read_result(request, result_file, proc.returncode)
    report = json.loads((built.artifact_dir / "report.json").read_text())
    return Built(model, built, report, time.monotonic() - started)


def gate_verdict(optimized: Built) -> tuple[bool, str]:
    acc, gate = optimized.report.get("accuracy"), optimized.report.get("gate")
    if not acc or not gate:
        return False, "no accuracy gate ran"
    return bool(gate.get("passed")), (
        f"accuracy gate {'passed' if gate.get('passed') else 'FAILED'}: {acc['metric']} "
        f"{acc['original']:.4f} → {acc['optimized']:.4f}, drop {acc['drop']:.4f} ≤ {gate['maxDrop']:g} "
        f"({gate['samples']} digits)")


def comparison(baseline: Built, optimized: Built) -> tuple[Table, dict]:
    """FP32 as exported vs the optimized engine: accuracy, MACs, size on disk, latency per batch size."""
    b, o = baseline.report, optimized.report
    acc = o.get("accuracy") or {}
    rows: dict[str, tuple] = {
        f"accuracy ({acc.get('metric', 'top1')})": (acc.get("original"), acc.get("optimized"), "acc"),
        "MACs per image": ((o.get("macs") or {}).get("original"), (o.get("macs") or {}).get("optimized"), "macs"),
        "size on disk": (b["sizes"]["engineBytes"], o["sizes"]["engineBytes"], "bytes"),
    }
    for size in sorted(set(b.get("latency", {})) & set(o.get("latency", {})), key=int):
        rows[f"latency batch {size}"] = (b["latency"][size]["meanMs"], o["latency"][size]["meanMs"], "ms")
    pruned = f"{o['pruning']['ratio']:.0%} pruned, " if o.get("pruning") else ""
    table = Table(title=f"FP32 vs optimized ({pruned}{o.get('precision', '?')})",
                  title_justify="left", header_style="bold")
    table.add_column("")
    table.add_column("FP32", justify="right")
    table.add_column("optimized", justify="right")
    table.add_column("change", justify="right")
    figures = {}
    for name, (before, after, kind) in rows.items():
        table.add_row(name, _fmt(before, kind), _fmt(after, kind), _change(before, after, kind))
        figures[name] = {"fp32": before, "optimized": after}
    return table, figures


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"acc": f"{value:.4f}", "macs": fmt_macs(value), "bytes": fmt_bytes(value),
            "ms": f"{value:.3f} ms"}[kind]


def _change(before, after, kind: str) -> str:
    if before is None or after is None:
        return "-"
    if kind == "acc":
        return f"{(after - before) * 100:+.2f} pt"
    if kind == "ms":
        return f"{before / after:.1f}× faster" if after <= before else f"{after / before:.1f}× slower"
    return f"{after / before:.0%}" if before else "-"
