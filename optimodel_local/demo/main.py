"""The demo's orchestration: the parts in order, the tables, and what a Ctrl-C stops (see __init__)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from optimodel_local import run as local_run
from optimodel_local.command import make_tuner
from optimodel_local.demo import build as demo_build
from optimodel_local.demo.children import Children, sigterm_as_interrupt
from optimodel_local.demo.load import Phase, load_samples
from optimodel_local.demo.report import (TunerEvent, fmt_ms, inf_to_none, phase_rows, timeline,
                                         write_json_atomic)

EXIT_INTERRUPTED = 130
# the figures policy.decide puts first in a message, which the decision line already shows
FIGURES = re.compile(r"^p99 .*? ms/batch(, queue wait p99 \S+ ms)?: ")
REPORT, PLOT, REQUEST = "report.json", "report.png", "request.json"
LOAD_REQUESTS, LOAD_SAMPLES = "load-requests.jsonl", "load-samples.npy"


def run_demo(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    demo = Demo(args, console)
    with sigterm_as_interrupt():
        try:
            return demo.run()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            stopped = demo.stop()
            removed = demo.remove_partial()
            cleaned = f"removed {removed} half-written file(s)" if removed else "nothing half-written left"
            console.print(f"interrupted during {demo.part}: stopped {stopped} process(es), {cleaned}", markup=False)
            return EXIT_INTERRUPTED
        except local_run.LocalRunError as exc:
            demo.stop()
            demo.remove_partial()
            console.print(f"[red]error[/] during {demo.part}: {exc}")
            return exc.exit_code
        finally:
            demo.stop()


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args, self.console = args, console
        self.dir = Path(args.dir).resolve()
        self.store = self.dir / "store"
        self.children = Children()
        self.part = "start-up"
        self.timings: dict[str, float] = {}
        self.tuner_stop: threading.Event | None = None
        self.samples: list = []

    # ---- the five parts --------------------------------------------------------------------

    def run(self) -> int:
        low, high = (float(x) for x in str(self.args.rates).split(","))
        s = float(self.args.phase_seconds)
        phases = [Phase("low", low, s), Phase("high", high, s * 1.5), Phase("low", low, s)]
        self._forget_old_report()
        began = time.monotonic()

        with self._part("data"):
            demo_build.copy_examples(self.dir)
            message = demo_build.make_data(self.dir, self.children, self.console, self.args.data)
            self.console.print(f"[bold]1. data[/]  {message}", markup=True)
        with self._part("build"):
            log = self.dir / "build.log"
            baseline = demo_build.build(self.dir / demo_build.BASELINE_MANIFEST, self.store, self.children,
                                        self.console, "2. build  FP32 baseline (the CNN as exported)", log)
            optimized = demo_build.build(self.dir / demo_build.OPTIMIZED_MANIFEST, self.store, self.children,
                                         self.console, "   build  optimized: prune + distill, INT8, accuracy gate", log)
            passed, verdict = demo_build.gate_verdict(optimized)
            self.console.print(f"[{'green' if passed else 'red'}]{verdict}[/]")
            table, figures = demo_build.comparison(baseline, optimized)
            self.console.print(table)
        with self._part("serve"):
            model = optimized.model
            base = f"http://{self.args.host}:{self.args.port}"
            with (self.dir / "server.log").open("a") as server_log:
                proc = local_run.start_server(model, optimized.build, self.store, self.args.host, self.args.port,
                                              new_session=True, log=server_log)
            self.children.adopt(proc)
            local_run.wait_ready(proc, base)
            auto = model.spec.serving.batching.autotune
            slo, initial = auto.p99_latency_ms, model.spec.serving.batching.max_wait_ms
            self.console.print(f"[bold]3. serve[/]  {model.metadata.name} at {base}")
            self.console.print(f"   window {initial:g} ms; autotune: p99 ≤ {slo:g} ms, window "
                               f"{auto.min_wait_ms:g}–{auto.max_wait_ms:g} ms")
        with self._part("load"):
            events = self._load_and_tune(model, optimized, base, phases)
        with self._part("report"):
            rows = phase_rows(phases, self.samples, events, initial, slo)
            line = timeline(self.samples, events, initial, sum(p.seconds for p in phases))
            curl, answer = self._curl_line(model, base)
            data = self._report_data(model, optimized, verdict, passed, figures, rows, line, events, slo, initial)
            from optimodel_local.demo.plot import write_plot

            write_plot(self.dir / PLOT, line, inf_to_none(rows), slo, data["tuner"]["decisions"], initial,
                       f"optimodel demo: {model.metadata.name}, p99 SLO {slo:g} ms, autotune on")
        self.timings["total"] = time.monotonic() - began
        data["timings"] = {k: round(v, 1) for k, v in self.timings.items()}
        write_json_atomic(self.dir / REPORT, data)
        self._print_report(rows, events, slo, curl, answer)
        if self.args.once:
            return 0
        self.part = "serving"
        self.console.print(f"serving at {base} until Ctrl-C", markup=False)
        proc.wait()
        raise local_run.LocalRunError(f"the server exited with code {proc.returncode}", exit_code=3)

    def _load_and_tune(self, model, optimized, base: str, phases: list[Phase]) -> list[TunerEvent]:
        events: list[TunerEvent] = []
        data = np.load(self.dir / demo_build.DATA_DIR / "digits_test.npz")
        bodies, samples = self.dir / LOAD_REQUESTS, self.dir / LOAD_SAMPLES
        bodies.write_bytes(b"\n".join(_infer_body(img[None]) for img in data["image"][:64]) + b"\n")
        samples.unlink(missing_ok=True)
        url = f"{base}/v2/models/{model.metadata.name}/infer"
        total = sum(p.seconds for p in phases)
        self.console.print(f"[bold]4. load[/]  open loop, {' → '.join(f'{p.rate:g}/s' for p in phases)} "
                           f"over {total:.0f}s; tuner every {self.args.tune_interval:g}s")
        started: list[float] = []

        def on_decision(line: str) -> None:
            d = tuner.decisions[-1]
            at = time.monotonic() - started[0] if started else 0.0
            events.append(TunerEvent(round(at, 2), d.window_ms, d.previous_ms, d.reason, d.message))
            self._print_decision(line, d.reason)

        tuner = make_tuner(model, optimized.build, self.store, base, self.args.tune_interval, echo=on_decision)
        spec = ",".join(f"{p.name}:{p.rate:g}:{p.seconds:g}" for p in phases)
        proc = self.children.start([sys.executable, "-m", "optimodel_local.demo.load", "--url", url,
                                    "--bodies", str(bodies), "--phases", spec, "--out", str(samples)],
                                   stdout=subprocess.PIPE, text=True, env=local_run.child_env())
        _, self.tuner_stop = tuner.start(self.args.tune_interval)
        for line in proc.stdout:
            if line.startswith("phase "):
                index = int(line.split()[1])
                if not started:
                    started.append(time.monotonic())
                p = phases[index]
                self.console.print(f"  phase {index + 1}/{len(phases)}: {p.name}, {p.rate:g} req/s for {p.seconds:g}s",
                                   style="cyan")
        proc.wait()
        self.tuner_stop.set()
        if proc.returncode != 0 or not samples.exists():
            raise local_run.LocalRunError(f"the load generator exited with code {proc.returncode}")
        self.samples = load_samples(samples)
        return events

    def _print_decision(self, line: str, reason: str) -> None:
        """The tuner's own decision line (policy.describe), cut to fit a terminal: the figures on one
        line, the reason after them, the why (less the figures it repeats) indented below."""
        cut = line.find(f"  {reason}:")
        head, why = (line[:cut], line[cut + 2 + len(reason) + 1:].strip()) if cut > 0 else (line, "")
        why = FIGURES.sub("", why, count=1)
        self.console.print(Text(head, style="green" if " → " in head else ""))
        self.console.print(Padding(Text(f"{reason}: {why}" if why else reason, style="dim"), (0, 0, 0, 12)))

    # ---- the report --------------------------------------------------------------------

    def _report_data(self, model, optimized, verdict, passed, figures, rows, line, events, slo, initial) -> dict:
        reasons = Counter(e.reason for e in events)
        return {
            "model": model.metadata.name,
            "sloMs": slo,
            "gate": {"passed": passed, "verdict": verdict, **(optimized.report.get("accuracy") or {})},
            "build": {"comparison": figures, "cacheKey": optimized.build.result.cache_key,
                      "artifact": str(optimized.build.artifact_dir), "recipe": optimized.report.get("recipe")},
            "phases": inf_to_none(rows),
            "rejected": sum(r["rejected"] for r in rows),
            "tuner": {"initialWindowMs": initial, "decisions": [
                {"at": e.at, "windowMs": e.window_ms, "previousMs": e.previous_ms, "reason": e.reason,
                 "message": e.message} for e in events],
                "changes": sum(e.window_ms != e.previous_ms for e in events), "reasons": dict(reasons)},
            "timeline": line,
            "files": {"report": str(self.dir / REPORT), "plot": str(self.dir / PLOT),
                      "buildLog": str(self.dir / "build.log"), "serverLog": str(self.dir / "server.log")},
        }

    def _print_report(self, rows: list[dict], events: list[TunerEvent], slo: float, curl: str, answer: str) -> None:
        table = Table(title=f"5. report  p99 SLO {slo:g} ms", title_justify="left", header_style="bold")
        for name, justify in (("phase", "left"), ("req/s", "right"), ("served/s", "right"), ("p50 ms", "right"),
                              ("p99 ms", "right"), ("SLO", "center"), ("window ms", "left"), ("rejected", "right")):
            table.add_column(name, justify=justify)
        for r in rows:
            met = "[green]met[/]" if r["sloMet"] else "[red]missed[/]"
            table.add_row(r["phase"], f"{r['rateRps']:g}", f"{r['throughputRps']:.1f}", fmt_ms(r["p50Ms"]),
                          fmt_ms(r["p99Ms"]), met, _windows(r["windowsMs"]),
                          str(r["rejected"] + r["errors"]))
        self.console.print(table)
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(e.reason for e in events).most_common())
        changes = sum(e.window_ms != e.previous_ms for e in events)
        self.console.print(f"tuner: {len(events)} decisions, {changes} window changes ({reasons or 'none'})",
                           markup=False)
        took = ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items() if k != "total")
        self.console.print(f"took {self.timings['total']:.0f}s: {took}", markup=False)
        self.console.print(f"try it ({answer}):", markup=False)
        self.console.print(curl, markup=False, soft_wrap=True)
        self.console.print(f"report: {_show(self.dir / REPORT)}", markup=False, soft_wrap=True)
        self.console.print(f"plot:   {_show(self.dir / PLOT)}", markup=False, soft_wrap=True)

    def _curl_line(self, model, base: str) -> tuple[str, str]:
        """A request file and the curl line that sends it; asked here once, so the line is known to answer."""
        data = np.load(self.dir / demo_build.DATA_DIR / "digits_test.npz")
        request = self.dir / REQUEST
        request.write_bytes(_infer_body(data["image"][:1]))
        url = f"{base}/v2/models/{model.metadata.name}/infer"
        resp = httpx.post(url, content=request.read_bytes(), timeout=10)
        resp.raise_for_status()
        logits = np.asarray(resp.json()["outputs"][0]["data"]).reshape(-1)
        answer = f"the model reads this digit as {int(logits.argmax())}, its label is {int(data['labels'][0])}"
        short = url.replace("http://127.0.0.1:", "localhost:")
        return f"curl -s {short} \\\n     -d @{_show(request)}", answer

    # ---- stopping --------------------------------------------------------------------

    def _part(self, name: str):
        demo = self

        class _Timed:
            def __enter__(self):
                demo.part, self.t0 = name, time.monotonic()

            def __exit__(self, *exc):
                demo.timings[name] = time.monotonic() - self.t0

        return _Timed()

    def stop(self) -> int:
        if self.tuner_stop is not None:
            self.tuner_stop.set()
        return self.children.stop_all()

    def _forget_old_report(self) -> None:
        for name in (REPORT, PLOT, LOAD_SAMPLES):
            (self.dir / name).unlink(missing_ok=True)

    def remove_partial(self) -> int:
        """What an interrupted part leaves: temporary folders and files, publish staging folders."""
        removed = 0
        if not self.dir.exists():
            return 0
        for path in [*self.dir.glob(".*.tmp*"), *self.store.rglob("*.staging")] if self.store.exists() \
                else list(self.dir.glob(".*.tmp*")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed


def _infer_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                                   "data": [round(float(v), 4) for v in images.ravel()]}]}).encode()


def _windows(windows: list[float]) -> str:
    """The windows of a phase in a table cell: each step when few, the range when the tuner moved often."""
    if len(windows) <= 2:
        return " → ".join(f"{w:g}" for w in windows)
    return f"{min(windows):g}–{max(windows):g}, {len(windows) - 1} moves"


def _show(path: Path) -> str:
    """A path relative to the working directory when it is below it (shorter to read and paste)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

