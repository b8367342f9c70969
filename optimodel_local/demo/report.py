"""What the demo measured, as numbers (report.json), tables (the terminal) and a plot (report.png)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from optimodel_local.demo.load import Phase, Sample


@dataclass(frozen=True)
class TunerEvent:
    at: float                # seconds since the load started
    window_ms: float
    previous_ms: float
    reason: str
    message: str


def percentile(values: list[float], q: float, total: int) -> float | None:
    """q-th percentile over `total` requests; the ones not in `values` (unanswered) count as infinitely slow."""
    if not total:
        return None
    k = int(math.ceil(q / 100 * total)) - 1
    ordered = sorted(values)
    return round(ordered[k], 2) if k < len(ordered) else math.inf


def window_at(events: list[TunerEvent], at: float, initial: float) -> float:
    window = initial
    for e in events:
        if e.at <= at:
            window = e.window_ms
    return window


def phase_rows(phases: list[Phase], samples: list[Sample], events: list[TunerEvent], initial_window: float,
               slo_ms: float) -> list[dict]:
    rows, begin = [], 0.0
    for index, phase in enumerate(phases):
        mine = [s for s in samples if s.phase == index]
        ok = [s.latency_ms for s in mine if s.status == 200]
        end = begin + phase.seconds
        windows = [window_at(events, begin, initial_window)]
        for e in events:
            if begin < e.at <= end and e.window_ms != windows[-1]:
                windows.append(e.window_ms)
        p99 = percentile(ok, 99, len(mine))
        rows.append({
            "phase": phase.name, "rateRps": phase.rate, "seconds": phase.seconds, "sent": len(mine),
            "ok": len(ok), "rejected": sum(s.status == 503 for s in mine),
            "errors": sum(s.status not in (200, 503) for s in mine),
            "throughputRps": round(len(ok) / phase.seconds, 1),
            "p50Ms": percentile(ok, 50, len(mine)), "p99Ms": p99, "sloMs": slo_ms,
            "sloMet": p99 is not None and p99 <= slo_ms,
            "windowsMs": windows,
            "decisions": sum(begin < e.at <= end for e in events),
        })
        begin = end
    return rows


def timeline(samples: list[Sample], events: list[TunerEvent], initial_window: float, seconds: float,
             step_s: float = 2.0) -> dict:
    """Per-step arrival rate, p99 of the requests sent in that step, and the window in force at its end.
    Steps of 2 s: at 100 req/s a p99 needs a few hundred requests to be more than the slowest one."""
    n = max(1, int(math.ceil(seconds / step_s)))
    buckets: list[list[Sample]] = [[] for _ in range(n)]
    for s in samples:
        buckets[min(n - 1, int(s.at / step_s))].append(s)
    t, rate, p99, window, failed = [], [], [], [], []
    for i, bucket in enumerate(buckets):
        ok = [s.latency_ms for s in bucket if s.status == 200]
        width = min(step_s, seconds - i * step_s)  # the last step may be shorter
        t.append(round(i * step_s + width / 2, 2))
        rate.append(round(len(bucket) / width, 1))
        value = percentile(ok, 99, len(bucket)) if bucket else None
        p99.append(None if value is None or math.isinf(value) else value)
        window.append(window_at(events, (i + 1) * step_s, initial_window))
        failed.append(len(bucket) - len(ok))
    # p99Ms is null where more than 1 % of the step's requests got no answer (rejected): no finite p99
    return {"stepSeconds": step_s, "t": t, "arrivalRps": rate, "p99Ms": p99, "windowMs": window,
            "unanswered": failed}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def fmt_macs(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} M"


def inf_to_none(rows: list[dict]) -> list[dict]:
    """JSON has no infinity: an unanswered tail is null (with sloMet false)."""
    return [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
