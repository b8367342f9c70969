"""Proof bench for the builder's compression stages, measured side by side on ONNX Runtime CPU.

    python bench/builder.py [--model digits|mobilenet|minilm|all] [--reps N]

For each model it builds the variants with the real stage functions (prune_model, distill,
quantize_onnx), checks accuracy against the original, and times every variant in one
interleaved loop at batch 32 with identical session options (bench/_ort.py). The targets
come from issue 3; a missed target is printed as MISSED with the measured figure, never
hidden. The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from bench._ort import THREADS, interleaved_latency, op_histogram, run_all, session, softmax  # noqa: E402
from builder_job.distill import distill  # noqa: E402
from builder_job.prune import prune_model  # noqa: E402
from builder_job.quantize import quantize_onnx  # noqa: E402
from optimodel.target import host_cpu_class  # noqa: E402
from optimodel.target import CPU  # noqa: E402

BUILD = ROOT / "examples" / "build"
OUT = ROOT / "bench" / "out"
BATCH = 32


def log(msg: str) -> None:
    print(msg, flush=True)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def ensure(maker: str, *files: str) -> None:
    if not all((BUILD / f).exists() for f in files):
        subprocess.run([sys.executable, str(ROOT / "examples" / maker)], check=True)


def export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False)
    return path


def bench_digits(reps: int) -> dict:
    from examples.digits_cnn import build_model

    ensure("make_digits.py", "digits_cnn.pt", "digits_train.npz", "digits_calib.npz", "digits_test.npz")
    train = dict(np.load(BUILD / "digits_train.npz"))
    calib = dict(np.load(BUILD / "digits_calib.npz"))
    test = dict(np.load(BUILD / "digits_test.npz"))
    teacher = build_model()
    teacher.load_state_dict(torch.load(BUILD / "digits_cnn.pt", map_location="cpu", weights_only=True))
    teacher.eval()
    example = torch.from_numpy(test["image"][:1])

    start = time.perf_counter()
    pruned = prune_model(teacher, (example,), ratio=0.5, method="l2", round_to=8)
    student = distill(pruned.model, teacher, train, ["image"], epochs=15, temperature=4.0, alpha=0.7,
                      log=lambda m: log("  " + m))
    prune_s = time.perf_counter() - start

    paths = {"fp32": export(teacher, example, OUT / "digits_fp32.onnx"),
             "pruned_fp32": export(student, example, OUT / "digits_pruned.onnx")}
    q = quantize_onnx(paths["fp32"], OUT / "digits_int8.onnx", "int8", CPU, calib)
    qp = quantize_onnx(paths["pruned_fp32"], OUT / "digits_pruned_int8.onnx", "int8", CPU, calib)
    paths["int8"], paths["pruned_int8"] = q.path, qp.path
    log(f"  int8 recipe: {q.recipe}")

    sessions = {k: session(p) for k, p in paths.items()}
    acc = {k: float((run_all(s, {"image": test["image"]}).argmax(1) == test["labels"]).mean())
           for k, s in sessions.items()}
    lat, speed = interleaved_latency(sessions, {"image": test["image"][:BATCH]}, reps=reps, baseline="fp32")
    drop = {k: round(100 * (acc["fp32"] - acc[k]), 2) for k in acc}
    macs_cut = pruned.macs_reduction
    checks = {
        "prune_distill_within_0.5pt": drop["pruned_fp32"] <= 0.5,
        "prune_macs_cut_ge_40pct": macs_cut >= 0.40,
        "int8_within_0.5pt": drop["int8"] <= 0.5,
        "pruned_int8_ge_3x": speed["pruned_int8"] >= 3.0,
        "pruned_int8_within_0.5pt": drop["pruned_int8"] <= 0.5,
    }
    log(f"digits CNN, {len(test['labels'])} test images, batch {BATCH}, prune+distill {prune_s:.0f}s")
    log(f"  MACs {pruned.macs_before:,} -> {pruned.macs_after:,} (-{100 * macs_cut:.1f} %), "
        f"params {pruned.params_before:,} -> {pruned.params_after:,}")
    for k in paths:
        log(f"  {k:12s} test acc {100 * acc[k]:6.2f} %  (drop {drop[k]:+.2f} pt)  "
            f"{1e3 * lat[k]:7.2f} ms/batch  {speed[k]:.2f}x vs fp32 (median of paired rounds)")
    for name, ok in checks.items():
        log(f"  target {name}: {verdict(ok)}")
    return {"testAccuracy": acc, "dropPoints": drop, "latencyMs": {k: round(1e3 * v, 3) for k, v in lat.items()},
            "speedup": {k: round(v, 3) for k, v in speed.items()}, "macsBefore": pruned.macs_before,
            "macsAfter": pruned.macs_after, "macsCut": round(macs_cut, 4), "int8Recipe": q.recipe,
            "targets": checks}


def bench_mobilenet(reps: int) -> dict:
    ensure("make_mobilenet.py", "mobilenet_v2.onnx", "mobilenet_calib.npz", "mobilenet_eval.npz")
    calib = dict(np.load(BUILD / "mobilenet_calib.npz"))
    evals = np.load(BUILD / "mobilenet_eval.npz")["image"]
    start = time.perf_counter()
    q = quantize_onnx(BUILD / "mobilenet_v2.onnx", OUT / "mobilenet_v2_int8.onnx", "int8", CPU, calib)
    quant_s = time.perf_counter() - start
    log(f"  int8 recipe: {q.recipe}")
    log(f"  int8 graph ops: {op_histogram(q.path)}")
    fp32, int8 = session(BUILD / "mobilenet_v2.onnx"), session(q.path)
    lf, lq = run_all(fp32, {"image": evals}), run_all(int8, {"image": evals})
    confident = softmax(lf).max(1) >= 0.5
    top1_f, top1_q = lf.argmax(1), lq.argmax(1)
    agree_conf = float((top1_f == top1_q)[confident].mean())
    agree_all = float((top1_f == top1_q).mean())
    in_top5 = float((np.argsort(-lq, axis=1)[:, :5] == top1_f[:, None]).any(1).mean())
    # mean KL(FP32 || INT8) of the softmax over all crops: a finer-grained view than agreement on
    # the ~160 confident crops, where one flipped crop moves the figure by 0.006
    pf, pq = softmax(lf), softmax(lq)
    kl = float((pf * (np.log(pf + 1e-12) - np.log(pq + 1e-12))).sum(1).mean())
    lat, ratios = interleaved_latency({"fp32": fp32, "int8": int8}, {"image": evals[:BATCH]}, reps=reps, inner=1)
    speed = ratios["int8"]
    checks = {"int8_ge_1.8x": speed >= 1.8, "agreement_confident_ge_0.99": agree_conf >= 0.99,
              "fp32_top1_in_int8_top5_ge_0.95": in_top5 >= 0.95}
    log(f"MobileNetV2, {len(evals)} eval crops ({int(confident.sum())} where FP32 top prob >= 0.5), "
        f"calibration {len(calib['image'])} disjoint crops, quantized in {quant_s:.0f}s")
    log(f"  top-1 agreement on confident crops {agree_conf:.4f}, on all crops {agree_all:.4f}; "
        f"FP32 top-1 in INT8 top-5 {in_top5:.4f}; mean KL(FP32||INT8) {kl:.4f}")
    log(f"  fp32 {1e3 * lat['fp32']:.1f} ms/batch, int8 {1e3 * lat['int8']:.1f} ms/batch (medians): {speed:.2f}x "
        f"(median of paired rounds)")
    for name, ok in checks.items():
        log(f"  target {name}: {verdict(ok)}")
    return {"agreementConfident": round(agree_conf, 4), "agreementAll": round(agree_all, 4),
            "fp32Top1InInt8Top5": round(in_top5, 4), "meanKl": round(kl, 4), "confidentCrops": int(confident.sum()), "crops": len(evals),
            "latencyMs": {k: round(1e3 * v, 2) for k, v in lat.items()}, "speedup": round(speed, 3),
            "int8Recipe": q.recipe, "targets": checks}


def bench_minilm(reps: int) -> dict:
    ensure("make_minilm.py", "minilm.onnx", "minilm_sentences.npz")
    data = np.load(BUILD / "minilm_sentences.npz")
    feeds = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    q = quantize_onnx(BUILD / "minilm.onnx", OUT / "minilm_int8.onnx", "int8", CPU, calibration=None)
    fp32, int8 = session(BUILD / "minilm.onnx"), session(q.path)
    ef, eq = run_all(fp32, feeds), run_all(int8, feeds)
    cos = (ef * eq).sum(1) / (np.linalg.norm(ef, axis=1) * np.linalg.norm(eq, axis=1))
    lat, ratios = interleaved_latency({"fp32": fp32, "int8": int8}, {k: v[:BATCH] for k, v in feeds.items()},
                                      reps=reps, inner=1, warmup=1)
    speed = ratios["int8"]
    checks = {"int8_dynamic_ge_1.8x": speed >= 1.8, "mean_cosine_ge_0.99": float(cos.mean()) >= 0.99}
    log(f"MiniLM-L6, {len(cos)} sentences, seq 128, recipe {q.recipe}")
    log(f"  cosine to FP32: mean {cos.mean():.4f}, min {cos.min():.4f}")
    log(f"  fp32 {1e3 * lat['fp32']:.1f} ms/batch, int8 {1e3 * lat['int8']:.1f} ms/batch (medians): {speed:.2f}x "
        f"(median of paired rounds)")
    for name, ok in checks.items():
        log(f"  target {name}: {verdict(ok)}")
    return {"cosineMean": round(float(cos.mean()), 5), "cosineMin": round(float(cos.min()), 5),
            "latencyMs": {k: round(1e3 * v, 2) for k, v in lat.items()}, "speedup": round(speed, 3),
            "recipe": q.recipe, "targets": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["digits", "mobilenet", "minilm", "all"], default="all")
    parser.add_argument("--reps", type=int, default=15, help="interleaved timing rounds (median is reported)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    host = {"cpu": platform.processor() or platform.machine(), "vnni": host_cpu_class() == "vnni", "threads": THREADS,
            "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0], "batch": BATCH}
    log(f"host: {host}")
    results: dict = {"bench": "builder", "host": host}
    models = ["digits", "mobilenet", "minilm"] if args.model == "all" else [args.model]
    for name in models:
        start = time.perf_counter()
        results[name] = {"digits": bench_digits, "mobilenet": bench_mobilenet, "minilm": bench_minilm}[name](args.reps)
        results[name]["benchSeconds"] = round(time.perf_counter() - start, 1)
    results["allTargetsMet"] = all(ok for name in models for ok in results[name]["targets"].values())
    print(json.dumps(results, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
