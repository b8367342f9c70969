"""Timing and evaluation helpers shared by the builder benches (ONNX Runtime CPU)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

THREADS = 2


def session(path: Path | str, threads: int = THREADS) -> ort.InferenceSession:
    """Every side of a comparison gets exactly these options."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out)


def interleaved_latency(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray],
                        reps: int = 15, inner: int = 3, warmup: int = 3,
                        baseline: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call for each session, and median paired speedup vs `baseline`.

    Runs are interleaved A B C A B C ... (order reversed every other round). Interleaving
    matters on a shared 2-core machine: a neighbour's burst then slows every side alike
    instead of whichever happened to be running. The speedup is the median over rounds of
    baseline_time / variant_time within the same round, which cancels slow drifts in load
    better than a ratio of two medians.
    """
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for rep in range(reps):
        order = list(sessions) if rep % 2 == 0 else list(reversed(list(sessions)))
        for name in order:
            sess = sessions[name]
            start = time.perf_counter()
            for _ in range(inner):
                sess.run(None, feeds)
            samples[name].append((time.perf_counter() - start) / inner)
    base = baseline or next(iter(sessions))
    speedup = {k: statistics.median(b / x for b, x in zip(samples[base], v)) for k, v in samples.items()}
    return {k: statistics.median(v) for k, v in samples.items()}, speedup


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def op_histogram(path: Path | str) -> dict[str, int]:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops
