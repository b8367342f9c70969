"""The latency-SLO tuner side by side with fixed windows and other controllers, on the same traffic.

    python bench/tuner.py [--quick] [--out bench/out/tuner]

Patterns (open loop, Poisson): steady-low, steady-near-sat, step-up (×4), step-down, on/off bursts,
slow ramp. Controllers: fixed 0 ms (Triton's default), 10 ms (Ray Serve's), 100 ms (TorchServe's),
AIMD on the window (Clipper-style), a BentoML-style cost model, and ours (optimodel.tuning.policy).
The oracle is the best fixed window per pattern, found by a sweep of fixed windows.

Two engines:
- ort-mlp: the real ONNX Runtime MLP (bench/make_mlp.py, one thread) behind the real
  serving_image Batcher in this process, real time. Latency = completion − intended send
  time. Its rates are bounded by this Python load generator, not by the engine.
- replay-sim: a SIMULATION, not a GPU. The server's batching rule replayed in virtual time
  over an engine that takes, per batch, the mean latency NVIDIA published for ResNet-50
  v1.5 with TensorRT FP16 on one A100 through Triton (NVIDIA/DeepLearningExamples, the
  resnet50 Triton README's offline table; see A100_RESNET50_TRT_FP16): about 2.1 ms at
  batch 1, 5.8 ms at 16, 11.2 ms at 32, a large fixed cost per batch and a small one per
  sample, as GPU engines have (×lognormal jitter, σ 0.05). The tuner's own model replays
  the same rule (without the jitter), so here the policy's model is close to the truth;
  ort-mlp is the test where it is not.

What a window is worth. The server's batcher is work-conserving with one engine instance:
while a batch runs the next one grows, so under load batches fill without any window, and
nothing in the server (or in this simulation) runs concurrent instances that a window
could keep from splitting the load into small batches. On the GPU profile the sweep
printed first shows the consequence: fixed windows of 0–5 ms give the same goodput at
every load, longer ones only add latency (10 ms breaks the SLO from 0.9 × capacity). So no
pattern here has phases whose best windows differ; an adaptive controller can tie the best
fixed window, not beat it, and its worth shows against fixed defaults that are wrong for
the SLO (10 ms, 100 ms) and against AIMD, which drifts to long windows while p99 is low.

Ties. The oracle is the best of a sweep of near-equal fixed windows, the luckiest draw,
so "goodput at least that of the best fixed window" treats a shortfall below the
measurement's resolution as a tie: the larger of (1) the spread between the oracle's
window and the same window run again on the same arrivals (a fresh jitter stream in the
simulation, a second real-time run on ort-mlp) and (2) √N of the oracle's N good answers
(a Poisson count is known to about ±√N). The strict comparison is printed next to it.
Likewise a breach interval of ours that every fixed window near the window ours had in
force also broke (the sweep windows either side of it) comes from the arrivals, not from
the controller: those are counted apart ("shared"), and the breach target counts the
rest; the strict count is printed too.

Every run starts with a few unscored warm-up intervals at the pattern's first rate, all
controllers from a 10 ms window, so no figure hinges on where a window starts.

Every controller sees the same Observation per interval (p99 as the interval between the
server's histogram bounds). Figures per pattern and controller: goodput (answers within the
SLO per second) as a fraction of the oracle's, the share of intervals whose p99 broke the SLO,
intervals to settle after a step, ConfigMap writes (window changes). The last line is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from optimodel.batching import BatchingConfig  # noqa: E402
from optimodel.tuning import policy  # noqa: E402
from optimodel.tuning.model import EngineProfile  # noqa: E402
from optimodel.tuning.observation import Observation, fraction_below, quantile_interval  # noqa: E402
from serving_image.metrics import latency_buckets  # noqa: E402

BUCKETS_S = latency_buckets() + [math.inf]
MAX_BATCH = 32
# The simulated engine's profile: mean latency (ms) per batch size that NVIDIA published for ResNet-50 v1.5 on one
# A100 80GB (DGX A100), ONNX Runtime with the TensorRT accelerator, FP16, Triton, "offline" scenario (one
# request of N images at a time): NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/triton/resnet50/
# README.md, table "Offline: NVIDIA DGX A100 (1x A100 80GB), ONNX Runtime TensorRT with FP16", column Avg
# Latency. These are client-side figures (they include the request's transfer), used here as engine time per
# batch. Batch 32 is where that engine's throughput peaks (2858/s; at 64 it falls to 2534/s), hence max batch 32.
A100_RESNET50_TRT_FP16 = ((1, 2.128), (2, 2.194), (4, 2.759), (8, 3.895), (16, 5.793), (32, 11.193))
# jitter per batch: lognormal, σ 0.05: in that table P99/Avg is 1.07–1.22 per batch size, ≈ 1.10 typically
# (= exp(2.33·σ) for σ ≈ 0.04), and it includes the network
SIM_SIGMA = 0.05
STEPS = {"step-up": [0.5], "step-down": [0.5]}


# ---- traffic -------------------------------------------------------------------------------

def pattern_rates(name: str, n: int, ref: float, warmup: int = 0) -> list[float]:
    """Arrival rate per interval, as a multiple of the engine's reference rate, after `warmup` intervals at the
    pattern's first rate (not scored: no controller's figures hinge on where its window starts)."""
    body = _pattern(name, n, ref)
    return [body[0]] * warmup + body


def _pattern(name: str, n: int, ref: float) -> list[float]:
    half = n // 2
    if name == "steady-low":
        return [0.1 * ref] * n
    if name == "steady-near-sat":
        return [0.85 * ref] * n
    if name == "step-up":
        return [0.2 * ref] * half + [0.8 * ref] * (n - half)
    if name == "step-down":
        return [0.8 * ref] * half + [0.2 * ref] * (n - half)
    if name == "bursts":
        return [(0.8 if (i // 4) % 2 == 0 else 0.05) * ref for i in range(n)]
    if name == "ramp":
        return [ref * (0.05 + 0.85 * i / max(1, n - 1)) for i in range(n)]
    raise ValueError(name)


def arrivals(rates: list[float], interval_s: float, seed: int) -> list[float]:
    rng, out, t = random.Random(seed), [], 0.0
    for i, rate in enumerate(rates):
        end = (i + 1) * interval_s
        t = max(t, i * interval_s)
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            out.append(t)
    return out


def step_points(name: str, n: int) -> list[int]:
    if name in STEPS:
        return [n // 2]
    if name == "bursts":
        return [i for i in range(4, n, 4)]
    return []


# ---- controllers ---------------------------------------------------------------------------

class Fixed:
    def __init__(self, w: float):
        self.name, self.w = f"fixed-{w:g}ms", w

    def start(self) -> float:
        return self.w

    def next(self, obs: Observation, batches: list[tuple[int, float]]) -> float:
        return self.w


class AIMD:
    """Clipper-style AIMD on the window: +1 ms while p99 is under the SLO with a 20 % margin, ×0.5 on a breach."""

    name = "aimd"

    def __init__(self, slo: float, start: float, hi: float):
        self.slo, self.w, self.hi = slo, start, hi

    def start(self) -> float:
        return self.w

    def next(self, obs, batches) -> float:
        if obs.p99_ms is None:
            return self.w
        if obs.p99_ms.lo > self.slo:
            self.w = self.w * 0.5
        elif obs.p99_ms.hi < 0.8 * self.slo:
            self.w = min(self.hi, self.w + 1.0)
        return round(self.w, 3)


class BentoCost:
    """BentoML-style: least-squares batch time t(n) = a·n + b over the interval's batches, and a mean-latency
    wait rule: holding a batch open for one more request costs the batch 1/λ each and saves the newcomer a
    separate batch's fixed cost b, so wait while that pays, i.e. a window of b; capped by the SLO (its drop
    deadline)."""

    name = "bentoml-cost"

    def __init__(self, slo: float, start: float):
        self.slo, self.w = slo, start

    def start(self) -> float:
        return self.w

    def next(self, obs, batches) -> float:
        if len(batches) >= 5 and len({n for n, _ in batches}) >= 2:
            n = np.array([b[0] for b in batches], float)
            t = np.array([b[1] for b in batches], float)
            a, b = np.polyfit(n, t, 1)
            self.w = float(min(max(b, 0.0), self.slo))
        return round(self.w, 3)


class Ours:
    name = "optimodel"

    def __init__(self, slo: float, start: float, hi: float, profile: EngineProfile):
        self.bounds = policy.Bounds(slo, 0.0, hi, MAX_BATCH)
        self.state = policy.TunerState(window_ms=start)
        self.profile = profile
        self.settings = policy.PolicySettings(min_samples=100)
        self.reasons: list[str] = []

    def start(self) -> float:
        return self.state.window_ms

    def next(self, obs, batches) -> float:
        d = policy.decide(self.state, obs, self.profile, self.bounds, self.settings)
        self.state = d.state
        self.reasons.append(d.reason)
        return d.window_ms


# ---- one interval's observation ------------------------------------------------------------

def observation(lat_ms: list[float], waits_ms: list[float], batches: list[tuple[int, float]], arrived: int,
                seconds: float, window: float, slo: float) -> Observation:
    def buckets(values_ms):
        s = sorted(v / 1000.0 for v in values_ms)
        return [(le, float(bisect.bisect_right(s, le))) for le in BUCKETS_S]

    lat = buckets(lat_ms)
    return Observation(
        seconds=seconds, samples=len(lat_ms), arrival_rps=arrived / seconds,
        p99_ms=quantile_interval(lat, 0.99), under_slo=fraction_below(lat, slo),
        mean_batch=sum(n for n, _ in batches) / len(batches) if batches else None,
        queue_p99_ms=quantile_interval(buckets(waits_ms), 0.99),
        engine_ms=sum(t for _, t in batches) / len(batches) if batches else None,
        window_ms=window)


def exact_p99(values: list[float]) -> float | None:
    if len(values) < 20:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(math.ceil(0.99 * len(s))) - 1)]


@dataclass
class Run:
    controller: str
    windows: list[float] = field(default_factory=list)   # in force during each interval
    p99: list[float | None] = field(default_factory=list)
    good: int = 0
    answered: int = 0
    seconds: float = 0.0

    @property
    def goodput(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0


# ---- engine 1: the replay simulation (virtual time) ----------------------------------------

def simulate(ctrl, times: list[float], n_intervals: int, interval_s: float, slo: float, profile: EngineProfile,
             seed: int, warmup: int, sigma: float = SIM_SIGMA) -> Run:
    # the jitter is a function of time, the same for every controller (common random numbers): a slow
    # stretch of the "GPU" hits all of them alike, so their differences are the controllers'
    rng = random.Random(seed)
    noise = [rng.gauss(0, sigma) for _ in range(100_003)]
    run, window = Run(ctrl.name), ctrl.start()
    q: list[float] = []
    free_at, i, now = 0.0, 0, 0.0
    per: list[tuple[list, list, list, int]] = [([], [], [], 0) for _ in range(n_intervals)]
    for k, t in enumerate(times):
        per[min(int(t / interval_s), n_intervals - 1)] = per[min(int(t / interval_s), n_intervals - 1)][:3] + \
            (per[min(int(t / interval_s), n_intervals - 1)][3] + 1,)
    for iv in range(n_intervals):
        end = (iv + 1) * interval_s
        w = window / 1000.0
        while True:  # one event at a time until the interval ends
            while i < len(times) and times[i] <= now:
                q.append(times[i])
                i += 1
            nxt = times[i] if i < len(times) else math.inf
            if now < free_at:
                now = min(free_at, nxt, end) if len(q) < MAX_BATCH else min(free_at, end)
            elif q and (len(q) >= MAX_BATCH or now >= q[0] + w):
                n = min(len(q), MAX_BATCH)
                took = profile.ms(n) * math.exp(noise[int(now * 1000.0) % len(noise)]) / 1000.0
                done = now + took
                slot = min(int(done / interval_s), n_intervals - 1)
                lat, waits, batches, arrived = per[slot]
                for a in q[:n]:
                    lat.append((done - a) * 1000.0)
                    waits.append((now - a) * 1000.0)
                batches.append((n, took * 1000.0))
                del q[:n]
                free_at = done
            else:
                now = min(nxt, q[0] + w if q else math.inf, end)
            if now >= end:
                break
        lat, waits, batches, arrived = per[iv]
        obs = observation(lat, waits, batches, arrived, interval_s, window, slo)
        if iv >= warmup:
            run.windows.append(window)
            run.p99.append(exact_p99(lat))
            run.good += sum(1 for v in lat if v <= slo)
            run.answered += len(lat)
        window = ctrl.next(obs, batches)
    run.seconds = (n_intervals - warmup) * interval_s
    return run


# ---- engine 2: the real ORT MLP behind the real Batcher (real time) ------------------------

def ort_engine(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feeds: {"logits": session.run(["logits"], feeds)[0]}


def measure_profile(run_fn) -> EngineProfile:
    """ms per batch size, as the builder's profile stage records it (median here, see below)."""
    pts = []
    for b in (1, 2, 4, 8, 16, 32):
        x = {"input": np.random.default_rng(b).random((b, 256), dtype=np.float32)}
        for _ in range(10):
            run_fn(x)
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            t = time.perf_counter()
            run_fn(x)
            times.append((time.perf_counter() - t) * 1000.0)
        # the median: on a CPU shared with other jobs the mean carries their preemptions
        pts.append((b, float(np.median(times))))
    return EngineProfile(tuple(pts))


class TimedBatcherMetrics:
    """The Batcher's metrics hooks, kept per interval."""

    def __init__(self):
        self.batches: list[tuple[int, float]] = []
        self.waits: list[float] = []
        self._t = None
        outer = self

        class H:
            def __init__(self, fn):
                self.fn = fn

            def observe(self, v):
                self.fn(v)

            def set(self, v):
                pass

        self.compute = H(lambda v: setattr(outer, "_t", v * 1000.0))
        self.batch_size = H(lambda n: outer.batches.append((int(n), outer._t or 0.0)))
        self.queue_wait = H(lambda v: outer.waits.append(v * 1000.0))
        self.max_wait_ms = self.max_batch_size = H(lambda v: None)

    def error(self, *a):
        pass


async def real_run(ctrl, times: list[float], n_intervals: int, interval_s: float, slo: float, run_fn,
                   warmup: int, pool) -> Run:
    from serving_image.batcher import Batcher

    metrics = TimedBatcherMetrics()
    window = ctrl.start()
    batcher = Batcher(run_fn, BatchingConfig(max_wait_ms=window, max_batch_size=MAX_BATCH, max_queue=100000),
                      engine_max_batch=MAX_BATCH, metrics=metrics)
    await batcher.start()
    loop = asyncio.get_running_loop()
    x = {"input": np.random.default_rng(0).random((1, 256), dtype=np.float32)}
    run = Run(ctrl.name)
    per = [[] for _ in range(n_intervals)]
    arrived = [0] * n_intervals
    t0 = loop.time() + 0.05

    def done(intended: float, fut) -> None:
        end = loop.time()
        slot = min(max(int((end - t0) / interval_s), 0), n_intervals - 1)
        per[slot].append((end - t0 - intended) * 1000.0)

    async def feed():
        for t in times:
            delay = t0 + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            arrived[min(int(t / interval_s), n_intervals - 1)] += 1
            fut = batcher.submit(x, 1)
            fut.add_done_callback(lambda f, t=t: done(t, f))

    feeder = asyncio.create_task(feed())
    for iv in range(n_intervals):
        windows_in_force = window
        await asyncio.sleep(max(0.0, t0 + (iv + 1) * interval_s - loop.time()))
        batches, waits = metrics.batches, metrics.waits
        metrics.batches, metrics.waits = [], []
        lat = per[iv]
        obs = observation(lat, waits, batches, arrived[iv], interval_s, window, slo)
        if iv >= warmup:
            run.windows.append(windows_in_force)
            run.p99.append(exact_p99(lat))
            run.good += sum(1 for v in lat if v <= slo)
            run.answered += len(lat)
        if isinstance(ctrl, Ours):
            # in another process, as the operator or `optimodel run` is: the model replay must not hold this
            # process' GIL, which would stall the server loop it is measuring
            d = await loop.run_in_executor(pool, policy.decide, ctrl.state, obs, ctrl.profile, ctrl.bounds,
                                           ctrl.settings)
            ctrl.state = d.state
            ctrl.reasons.append(d.reason)
            window = d.window_ms
        else:
            window = ctrl.next(obs, batches)
        batcher.update_config(batcher.config.model_copy(update={"max_wait_ms": window}))
    await feeder
    await batcher.close()
    run.seconds = (n_intervals - warmup) * interval_s
    return run


# ---- figures -------------------------------------------------------------------------------

def breaches(run: Run, slo: float) -> int:
    return sum(1 for p in run.p99 if p is not None and p > slo)


def settle(run: Run, steps: list[int], slo: float, n: int) -> int | None:
    """Worst, over the steps, of the intervals until the window stops moving for the rest of the segment,
    counted to the first interval on that window whose p99 is under the SLO."""
    worst = 0
    bounds = steps + [n]
    for s, nxt in zip(steps, bounds[1:]):
        for k in range(0, nxt - s):
            still = all(run.windows[j] == run.windows[s + k] for j in range(s + k, nxt))
            if still and (run.p99[s + k] is None or run.p99[s + k] <= slo):
                worst = max(worst, k)
                break
        else:
            return None
    return worst


def writes(run: Run) -> int:
    return sum(1 for a, b in zip(run.windows, run.windows[1:]) if a != b)


def plotted(runs: dict, res: dict) -> dict:
    """The runs a pattern's PNG shows: the adaptive controllers, the common fixed windows and the oracle's."""
    keep = ("optimodel", "aimd", "bentoml-cost", "fixed-0ms", "fixed-10ms", f"fixed-{res['oracleWindowMs']:g}ms")
    return {k: v for k, v in runs.items() if k in keep}


def plot(path: Path, title: str, rates, runs: dict[str, Run], slo: float, interval_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [i * interval_s for i in range(len(rates))]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for name, run in runs.items():
        a1.plot(x, [p if p is not None else float("nan") for p in run.p99], label=name, lw=1.2)
        a2.step(x, run.windows, where="post", label=name, lw=1.2)
    a1.axhline(slo, color="k", ls="--", lw=1, label="SLO")
    a1.set_ylabel("p99 ms")
    a1.set_yscale("log")
    a1.legend(fontsize=7, ncol=3)
    a2.set_ylabel("window ms")
    a2.set_yscale("symlog", linthresh=1)
    a3.step(x, rates, where="post", color="gray")
    a3.set_ylabel("arrivals / s")
    a3.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
        return f"{name}, vnni={'yes' if 'vnni' in out else 'no'}, {platform.machine()}"
    except OSError:
        return platform.processor() or "?"


def controllers(slo: float, sweep: list[float], profile: EngineProfile, start: float, hi: float):
    return ([Fixed(w) for w in sweep] + [AIMD(slo, start, hi), BentoCost(slo, start), Ours(slo, start, hi, profile)])


def oracle_of(runs: dict[str, Run], sweep: list[float], slo: float) -> float:
    fixed = {w: runs[f"fixed-{w:g}ms"] for w in sweep}
    return max(fixed, key=lambda w: (fixed[w].goodput, -breaches(fixed[w], slo)))


def tie_tolerance(oracle: Run, repeat: Run) -> tuple[float, str]:
    """How far below the oracle's goodput (answers/s) a controller may fall and still tie it.

    The oracle is the luckiest of near-equal fixed windows (the maximum of a sweep), so a strict "≥" asks a
    controller to beat noise. Two measures of that noise, the larger one counts: (1) the oracle's window run a
    second time on the same arrivals (a fresh engine-jitter stream in the simulation, a second real-time run on
    the real engine): the repeat spread; (2) a Poisson-count bound: goodput counts N good answers, and a count of
    independent events is only known to ±√N. Shortfalls within that are reported as ties, never hidden: the strict
    comparison is printed next to it."""
    spread = abs(oracle.good - repeat.good)
    poisson = math.sqrt(max(oracle.good, 1))
    tol = max(spread, poisson) / oracle.seconds
    return tol, f"repeat spread {spread} answers, √N {poisson:.0f} answers"


def breach_split(ours: Run, runs: dict[str, Run], sweep: list[float], slo: float) -> tuple[int, int]:
    """(breach intervals of ours, of which shared): an interval is shared when every fixed window near the one ours
    had in force (the sweep windows either side of it, or that window and both neighbours where it is one) broke
    the SLO in that interval too. Such a breach comes from the arrivals (a Poisson burst past what the engine
    serves), not from the controller's choice; the rest are the controller's own."""
    total = shared = 0
    for i, p in enumerate(ours.p99):
        if p is None or p <= slo:
            continue
        total += 1
        w = ours.windows[i]
        k = bisect.bisect_left(sweep, w)
        if k < len(sweep) and sweep[k] == w:
            near = sweep[max(0, k - 1):k + 2]
        else:
            near = sweep[max(0, k - 1):k + 1]
        fixed = [runs[f"fixed-{v:g}ms"].p99[i] for v in near]
        if near and all(q is not None and q > slo for q in fixed):
            shared += 1
    return total, shared


def evaluate(engine: str, pattern: str, runs: dict[str, Run], sweep: list[float], slo: float, n: int,
             repeat: Run) -> dict:
    fixed = {w: runs[f"fixed-{w:g}ms"] for w in sweep}
    best_w = oracle_of(runs, sweep, slo)
    oracle = fixed[best_w]
    tol, tol_why = tie_tolerance(oracle, repeat)
    steps = step_points(pattern, n)
    figs = {}
    for name, run in runs.items():
        total, shared = breach_split(run, runs, sweep, slo) if name != oracle.controller else (breaches(run, slo), 0)
        figs[name] = {"goodput": round(run.goodput, 1),
                      "vsOracle": round(run.goodput / oracle.goodput, 4) if oracle.goodput else None,
                      "tiesOracle": run.goodput >= oracle.goodput - tol,
                      "breachIntervals": total, "sharedBreaches": shared, "writes": writes(run),
                      "settle": settle(run, steps, slo, n) if steps else None}
    oracle_breaches = figs[oracle.controller]["breachIntervals"]

    def targets_of(f: dict) -> tuple[dict, dict]:
        targets, strict = {}, {}
        if pattern.startswith("steady"):
            targets["goodput>=0.95·oracle"] = f["vsOracle"] is not None and f["vsOracle"] >= 0.95
        else:
            allowed = math.ceil(oracle_breaches / 5) if oracle_breaches else 1
            targets["goodput>=bestFixed (ties within resolution)"] = f["tiesOracle"]
            strict["goodput>=bestFixed"] = f["vsOracle"] is not None and f["vsOracle"] >= 1.0
            targets[f"ownBreaches<={allowed}"] = f["breachIntervals"] - f["sharedBreaches"] <= allowed
            strict[f"breaches<={allowed}"] = f["breachIntervals"] <= allowed
        if steps:
            targets["settled<=3"] = f["settle"] is not None and f["settle"] <= 3
        return targets, strict

    targets, strict = targets_of(figs["optimodel"])
    # the same targets for every other adaptive controller: do they separate the controllers?
    others = {name: all(targets_of(figs[name])[0].values()) for name in ("aimd", "bentoml-cost")}
    return {"engine": engine, "pattern": pattern, "oracleWindowMs": best_w, "othersMeetTargets": others,
            "oracleRepeatGoodput": round(repeat.goodput, 1), "oracleRepeatBreaches": breaches(repeat, slo),
            "tieToleranceRps": round(tol, 2),
            "tieBasis": tol_why, "controllers": figs, "targets": targets, "strict": strict}


def print_table(res: dict) -> None:
    print(f"\n[{res['engine']}] {res['pattern']}: oracle = fixed {res['oracleWindowMs']:g} ms; its repeat "
          f"{res['oracleRepeatGoodput']:.1f}/s with {res['oracleRepeatBreaches']} breach intervals (the noise floor, "
          f"not used by the targets); tie within {res['tieToleranceRps']:.1f}/s ({res['tieBasis']})")
    print(f"  {'controller':<14} {'goodput/s':>10} {'×oracle':>8} {'tie':>4} {'breach iv':>9} {'shared':>6} "
          f"{'settle':>6} {'writes':>6}")
    for name, f in res["controllers"].items():
        print(f"  {name:<14} {f['goodput']:>10.1f} {f['vsOracle'] or 0:>8.4f} {'yes' if f['tiesOracle'] else 'no':>4} "
              f"{f['breachIntervals']:>9} {f['sharedBreaches']:>6} {'-' if f['settle'] is None else f['settle']:>6} "
              f"{f['writes']:>6}")
    print("  targets: " + ", ".join(f"{k} {str(v).lower()}" for k, v in res["targets"].items())
          + "; the same targets met by " + ", ".join(f"{k} {str(v).lower()}" for k, v in res["othersMeetTargets"].items()))
    if res["strict"]:
        print("  strict (no tie rule, every breach counted): "
              + ", ".join(f"{k} {str(v).lower()}" for k, v in res["strict"].items()))


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def window_sweep(profile: EngineProfile, slo: float, sweep: list[float]) -> list[dict]:
    """Does a window buy goodput on this engine, and where? Fixed windows at steady loads, 10 s each (virtual)."""
    print("  where a window buys goodput (steady load, 10 s; goodput/s and breach intervals per fixed window):")
    out = []
    for frac in (0.1, 0.5, 0.7, 0.8, 0.9, 0.95):
        times = arrivals([frac * profile.capacity_rps(MAX_BATCH)] * 10, 1.0, seed=5)
        row = {}
        for w in sweep:
            r = simulate(Fixed(w), times, 10, 1.0, slo, profile, 7, 0)
            row[w] = (round(r.goodput), breaches(r, slo))
        best = max(g for g, _ in row.values())
        print(f"    {frac:.2f}×capacity: " + "  ".join(f"{w:g}ms {g}/{b}" for w, (g, b) in row.items())
              + f"   (best {best}/s; windows within 0.5 %: "
              + ",".join(f"{w:g}" for w, (g, _) in row.items() if g >= 0.995 * best) + ")")
        out.append({"load": frac, "goodputBreaches": {f"{w:g}": v for w, v in row.items()}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two patterns, a short sweep, shorter runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "tuner"))
    ap.add_argument("--ort-rate", type=float, default=1500.0,
                    help="ort-mlp reference rate (req/s): what this Python load generator sustains, not the engine")
    args = ap.parse_args()
    out = Path(args.out)
    patterns = ["steady-near-sat", "step-up"] if args.quick else \
        ["steady-low", "steady-near-sat", "step-up", "step-down", "bursts", "ramp"]
    print(f"CPU: {cpu_model()}; load average {load_average()} (a machine shared with other jobs)")
    results = []
    started = time.time()

    # replay-sim: virtual time
    sim_profile = EngineProfile(A100_RESNET50_TRT_FP16)
    sim_slo, sim_iv, sim_n = 25.0, 1.0, 24 if args.quick else 40
    sim_sweep = [0, 10, 100] if args.quick else [0, 0.5, 1, 2, 5, 10, 20, 50, 100]
    sim_ref = sim_profile.capacity_rps(MAX_BATCH)
    print(f"replay-sim (a SIMULATION, not a GPU): the server's batching rule in virtual time over an engine that "
          f"sleeps per NVIDIA's published ResNet-50 TensorRT FP16 profile on one A100 (ms: "
          + ", ".join(f"b{b}={t:g}" for b, t in sim_profile.points)
          + f") ×lognormal(σ {SIM_SIGMA:g}); one engine instance, as the server runs; capacity {sim_ref:.0f}/s at "
          f"batch {MAX_BATCH}, SLO {sim_slo:g} ms, {sim_n} intervals of {sim_iv:g} s (virtual)")
    window_value = window_sweep(sim_profile, sim_slo, sim_sweep)
    sim_warm = 5
    for p_i, pattern in enumerate(patterns):
        rates = pattern_rates(pattern, sim_n, sim_ref, sim_warm)
        times = arrivals(rates, sim_iv, seed=100 + p_i)
        runs = {}
        for ctrl in controllers(sim_slo, sim_sweep, sim_profile, 10.0, 100.0):
            runs[ctrl.name] = simulate(ctrl, times, sim_n + sim_warm, sim_iv, sim_slo, sim_profile, 7, sim_warm)
        # the oracle's window again on the same arrivals, with a fresh engine-jitter stream: the tie resolution
        repeat = simulate(Fixed(oracle_of(runs, sim_sweep, sim_slo)), times, sim_n + sim_warm, sim_iv, sim_slo,
                          sim_profile, 8, sim_warm)
        rates = rates[sim_warm:]
        res = evaluate("replay-sim", pattern, runs, sim_sweep, sim_slo, sim_n, repeat)
        results.append(res)
        print_table(res)
        plot(out / f"replay-sim-{pattern}.png", f"replay-sim (simulation) — {pattern}", rates, plotted(runs, res),
             sim_slo, sim_iv)

    # ort-mlp: real time
    from make_mlp import make_mlp
    run_fn = ort_engine(make_mlp(ROOT / "bench" / "build" / "mlp.onnx"))
    ort_profile = measure_profile(run_fn)
    ort_slo, ort_iv, ort_n = 40.0, 0.5, 12 if args.quick else 20
    ort_sweep = [0, 10, 100] if args.quick else [0, 1, 2, 5, 10, 20, 50, 100]
    print(f"\nort-mlp (real ONNX Runtime, 1 thread, real Batcher): profile ms "
          + ", ".join(f"b{b}={t:.3f}" for b, t in ort_profile.points)
          + f"; SLO {ort_slo:g} ms, reference rate {args.ort_rate:g}/s, {ort_n} intervals of {ort_iv:g} s")
    ort_warm = 4
    # the tuner's replay is background work (in a cluster it runs in the operator's pod, not the server's): at a
    # lower priority, so on a small shared CPU it does not preempt the server whose latency is being measured
    pool = ProcessPoolExecutor(max_workers=1, initializer=os.nice, initargs=(10,))
    for p_i, pattern in enumerate(patterns):
        rates = pattern_rates(pattern, ort_n, args.ort_rate, ort_warm)
        times = arrivals(rates, ort_iv, seed=200 + p_i)
        runs = {}
        for ctrl in controllers(ort_slo, ort_sweep, ort_profile, 10.0, 100.0):
            runs[ctrl.name] = asyncio.run(real_run(ctrl, times, ort_n + ort_warm, ort_iv, ort_slo, run_fn,
                                                   ort_warm, pool))
        # the oracle's window measured a second time, same arrivals, real time: the tie resolution
        repeat = asyncio.run(real_run(Fixed(oracle_of(runs, ort_sweep, ort_slo)), times, ort_n + ort_warm, ort_iv,
                                      ort_slo, run_fn, ort_warm, pool))
        rates = rates[ort_warm:]
        res = evaluate("ort-mlp", pattern, runs, ort_sweep, ort_slo, ort_n, repeat)
        results.append(res)
        print_table(res)
        plot(out / f"ort-mlp-{pattern}.png", f"ort-mlp (real ONNX Runtime) — {pattern}", rates, plotted(runs, res),
             ort_slo, ort_iv)

    all_ok = all(v for r in results for v in r["targets"].values())
    strict_ok = all(v for r in results for v in list(r["targets"].values()) + list(r["strict"].values()))
    print(f"\nall targets met: {str(all_ok).lower()} (strictly, without the tie rule and the shared-breach split: "
          f"{str(strict_ok).lower()}); {time.time() - started:.0f} s; load average {load_average()}; PNGs in {out}")
    print(json.dumps({"cpu": cpu_model(), "loadAverage": load_average(), "quick": args.quick,
                      "allTargetsMet": all_ok, "allTargetsMetStrict": strict_ok, "windowValue": window_value,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
