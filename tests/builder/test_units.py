"""The plain functions behind the stages: metrics, MACs, profiles, stage log."""

from __future__ import annotations

import io
import math
import os
import time

import numpy as np
import pytest
import torch

from optimodel.build import BuildReason
from optimodel.spec import AccuracyGate, TensorSpec

from builder_job import gate, runtime
from builder_job.errors import BuildError
from builder_job.load import build_entrypoint
from builder_job.macs import onnx_macs
from builder_job.profile import ProfileSettings, profile_latency
from builder_job.stagelog import StageLog
from builder_job.tensorrt_engine import GpuInfo, profile_shapes

from .conftest import ROOT

AFFINITY = len(os.sched_getaffinity(0))


def test_scores_follow_from_the_outputs():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 10)).astype(np.float32)
    labels = logits.argmax(1).copy()
    labels[:30] = (labels[:30] + 1) % 10  # the original is right on 170 of 200
    changed = logits.copy()
    changed[:10] = np.roll(changed[:10], 1, axis=1)  # change the prediction of 10 samples
    flipped = int(np.sum(changed.argmax(1) != logits.argmax(1)))

    assert gate.score("top1", logits, logits, labels) == (170 / 200, 170 / 200)
    assert gate.score("top1-agreement", logits, changed, None) == (1.0, (200 - flipped) / 200)
    original, same = gate.score("cosine", logits, logits * 3.0, None)
    assert original == 1.0 and same == pytest.approx(1.0)
    _, opposite = gate.score("cosine", logits, -logits, None)
    assert opposite == pytest.approx(-1.0)
    with pytest.raises(BuildError) as info:
        gate.score("top1", logits, logits, None)
    assert info.value.reason == BuildReason.INVALID_DATASET


def test_gate_passes_within_max_drop_and_fails_beyond():
    data = {"x": np.eye(4, dtype=np.float32).repeat(25, axis=0)}
    identity = lambda feeds: [feeds["x"]]  # noqa: E731
    one_wrong = lambda feeds: [np.roll(feeds["x"], 1, axis=1) if len(feeds["x"]) < 64 else feeds["x"]]  # noqa: E731

    ok = gate.run_gate(AccuracyGate(dataset_uri="file:///g.npz", max_drop=0), identity, identity, data, ["x"])
    assert ok.drop == 0 and ok.optimized == 1.0
    # batches of 64 over 100 samples: the last 36 come out wrong
    loose = gate.run_gate(AccuracyGate(dataset_uri="file:///g.npz", max_drop=0.4), identity, one_wrong, data, ["x"])
    assert loose.optimized == pytest.approx(64 / 100)
    with pytest.raises(gate.GateFailed) as info:
        gate.run_gate(AccuracyGate(dataset_uri="file:///g.npz", max_drop=0.3), identity, one_wrong, data, ["x"])
    assert info.value.accuracy.drop == pytest.approx(0.36)
    assert "0.3600" in info.value.message and "0.3" in info.value.message


def test_onnx_macs_match_the_torch_layers(digits_build):
    model = build_entrypoint("examples.digits_cnn:build_model", str(ROOT)).eval()
    counted = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            k = module.in_features
        counted.append(output[0].numel() * k)

    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            layer.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    assert onnx_macs(digits_build / "digits_cnn.onnx") == sum(counted)


def test_profile_latency_grows_with_the_work():
    def runner(feeds):
        time.sleep(0.002 * len(feeds["x"]))
        return [feeds["x"]]

    spec = TensorSpec(name="x", dtype="float32", shape=[-1, 3])
    report = profile_latency(runner, [spec], 4, settings=ProfileSettings(seconds_per_batch=0.0, min_iters=5, warmup=1))
    assert sorted(report, key=int) == ["1", "2", "4"]
    assert all(row["iterations"] == 5 for row in report.values())
    assert report["4"]["p50Ms"] > report["1"]["p50Ms"] >= 2.0
    assert report["4"]["p50Ms"] <= report["4"]["p95Ms"] <= report["4"]["p99Ms"]


def test_example_inputs_follow_the_spec_and_tile_short_data():
    specs = [TensorSpec(name="ids", dtype="int64", shape=[-1, -1]), TensorSpec(name="x", dtype="float16", shape=[-1, 3])]
    feeds = runtime.example_inputs(specs, batch=5)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (5, runtime.DEFAULT_DYNAMIC_DIM)
    assert feeds["x"].dtype == np.float16 and feeds["x"].shape == (5, 3)
    data = {"x": np.arange(6, dtype=np.float16).reshape(2, 3)}
    tiled = runtime.example_inputs(specs[1:], batch=5, data=data)["x"]
    assert tiled.shape == (5, 3) and np.array_equal(tiled[2], data["x"][0])


def test_tensorrt_profile_shapes_and_product_label():
    image = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])
    assert profile_shapes(image, 32, None) == ((1, 1, 8, 8), (32, 1, 8, 8), (32, 1, 8, 8))
    tokens = TensorSpec(name="ids", dtype="int64", shape=[-1, -1])
    assert profile_shapes(tokens, 16, (1, 40)) == ((1, 1), (16, 40), (16, 40))
    gpu = GpuInfo(9, 0, "NVIDIA H100 80GB HBM3")
    assert (gpu.arch, gpu.compute_capability, gpu.product) == ("sm90", "9.0", "NVIDIA-H100-80GB-HBM3")


def test_stage_log_plain_lines_with_durations():
    stream = io.StringIO()
    log = StageLog(["a", "b"], stream=stream, fancy=False)
    with log.stage("a"):
        time.sleep(0.01)
    with pytest.raises(ValueError):
        with log.stage("b"):
            raise ValueError("boom")
    log.close()
    text = stream.getvalue()
    assert "[builder] a done in" in text and "[builder] b failed after" in text
    assert log.timings["a"] >= 0.01 and "b" in log.timings


def test_stage_log_progress_bar_renders():
    stream = io.StringIO()
    log = StageLog(["a"], stream=stream, fancy=True)
    with log.stage("a"):
        pass
    log.close()
    assert "a done in" in stream.getvalue()
    assert "1/1" in stream.getvalue()
