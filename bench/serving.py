"""Serving benchmark: the server against its own engine, measured side by side in one run.

For each model (digits CNN, MiniLM; ONNX Runtime CPU, same thread count everywhere):
  (a) raw engine throughput at maxBatchSize, called in-process (samples/s)
  (b) the server's highest throughput whose p99 stays under the stated SLO, from an
      open-loop sweep of arrival rates (one sample per request, binary protocol);
      efficiency = b / a
  (c) batching on vs off (maxBatchSize 1, applied live through the config file) at
      the same arrival rate
  (d) server overhead per request at batch 1: p50 of a request over loopback minus
      p50 of the engine call for the same input, alternated one by one (so both see
      the same machine load); the difference includes loopback TCP and this client
  (e) digits only: 32 concurrent closed-loop users of tiny requests, p99 (the setup in
      which issue 4 quotes Ray Serve, BentoML, MLServer, TorchServe at 60 to 300+ ms)
Also printed: CPU efficiency = raw engine CPU per sample / whole server process CPU per
sample at the server's top rate; unlike wall-clock figures it barely moves with the
load other tenants put on a shared machine.
The last line of output is one JSON object with every figure.

  (mlp) the issue-11 MLP: max open-loop rate at p99 <= 50 ms for the default engine threads and the
      other settings, server CPU us/request (JSON and binary) at 2,000 req/s, the overload figure at
      10x capacity, the load generator's ceiling against a do-nothing server; targets printed true/false.
      Under overload also: the CPU one 503 refusal costs the server, the cores the client took, and
      the physical ceiling that leaves (answers/s the remaining cores can pay for once every refusal
      is paid for); the engine's busy share and batch time and the p99 inside the server.
      The HTTP stack's own floor (do-nothing servers on uvicorn, granian, bare httptools) is
      bench/http_floor.py.

Usage: python bench/serving.py [--quick] [--models mlp,digits,minilm] [--threads 1] [--torchserve]
Loopback only; bounded by count and time (a few minutes in all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _loadgen import Client, closed_loop_latencies, concurrent_closed_loop, http_request, open_loop  # noqa: E402
from _proc import cpu_seconds, free_port  # noqa: E402

from optimodel.artifact import EngineInfo, Manifest, open_artifact, publish  # noqa: E402
from optimodel.batching import BatchingConfig, write_batching_config  # noqa: E402
from optimodel.spec import TensorSpec  # noqa: E402

BUILD = ROOT / "examples" / "build"


def _spec(name, dtype, shape):
    return TensorSpec(name=name, dtype=dtype, shape=shape)


MODELS = {
    "digits": {
        "onnx": "digits_cnn.onnx",
        "inputs": [_spec("image", "float32", [-1, 1, 8, 8])],
        "outputs": [_spec("logits", "float32", [-1, 10])],
        "max_batch": 32, "max_wait_ms": 2.0, "slo_ms": 25.0,
    },
    "minilm": {
        "onnx": "minilm.onnx",
        "inputs": [_spec("input_ids", "int64", [-1, 128]), _spec("attention_mask", "int64", [-1, 128])],
        "outputs": [_spec("embedding", "float32", [-1, 384])],
        # 8, not 32: on this CPU a batch of 32 takes ~1.5 s and buys no throughput (per-sample cost is
        # flat in the batch size), so 32 would only stretch the latency SLO
        "max_batch": 8, "max_wait_ms": 5.0, "slo_ms": None,  # None: 4 engine calls at maxBatchSize
    },
}


def samples(model: str) -> list[dict[str, np.ndarray]]:
    if model == "digits":
        x = np.load(BUILD / "digits_test.npz")["image"][:256]
        return [{"image": x[i:i + 1]} for i in range(len(x))]
    d = np.load(BUILD / "minilm_sentences.npz")
    return [{"input_ids": d["input_ids"][i:i + 1], "attention_mask": d["attention_mask"][i:i + 1]}
            for i in range(len(d["input_ids"]))]


def ensure_model(model: str) -> Path:
    path = BUILD / MODELS[model]["onnx"]
    if not path.exists():
        maker = {"digits": "make_digits.py", "minilm": "make_minilm.py"}[model]
        subprocess.run([sys.executable, str(ROOT / "examples" / maker)], check=True)
    return path


def make_artifact(model: str, workdir: Path) -> Path:
    cfg = MODELS[model]
    src = workdir / f"{model}-src"
    src.mkdir()
    shutil.copy(ensure_model(model), src / "model.onnx")
    manifest = Manifest(cache_key="bench" + "0" * 59, model_name=model, arch="cpu",
                        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
                        inputs=cfg["inputs"], outputs=cfg["outputs"], max_batch_size=cfg["max_batch"],
                        versions={}, files=[])
    dest = workdir / "store" / model
    publish(src, manifest, dest.as_uri())
    return dest


def binary_request(host: str, port: int, model: str, feeds: dict[str, np.ndarray]) -> bytes:
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    header = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": dt[v.dtype],
                          "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()],
              "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return http_request(host, port, f"/v2/models/{model}/infer", body,
                        {"Inference-Header-Content-Length": str(len(head))})


def raw_engine(artifact: Path, threads: int):
    from optimodel.batching import batch_size_ladder
    from serving_image.backends import load_backend, warm_up

    local, manifest = open_artifact(artifact.as_uri())
    backend = load_backend(local, manifest, threads=threads)
    warm_up(backend, batch_size_ladder(manifest.max_batch_size))
    return backend


def engine_throughput(backend, data: list[dict], batch: int, seconds: float) -> tuple[float, float, float]:
    """(samples/s, ms per call, CPU ms per sample) at a fixed batch, best of a few timed windows."""
    feeds = {k: np.concatenate([d[k] for d in (data * (batch // len(data) + 1))[:batch]]) for k in data[0]}
    backend.run(feeds)
    best, cpu_ms = 0.0, float("inf")
    for _ in range(3):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / 3 or n < 2:
            backend.run(feeds)
            n += 1
        best = max(best, n * batch / (time.perf_counter() - t0))
        cpu_ms = min(cpu_ms, (time.process_time() - c0) / (n * batch) * 1000)
    return best, batch / best * 1000, cpu_ms





class ServerProcess:
    def __init__(self, artifact: Path, config: Path, port: int, threads: int | None, extra: tuple = ()):
        """threads None: the server's own default, what a user gets."""
        self.port = port
        self.log = tempfile.TemporaryFile(mode="w+")
        thread_args = [] if threads is None else ["--threads", str(threads)]
        self.proc = subprocess.Popen([sys.executable, "-m", "serving_image", "--artifact", str(artifact),
                                      "--config", str(config), "--port", str(port), *thread_args,
                                      "--log-level", "warning", *extra], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        from optimodel_local.run import LocalRunError, wait_ready

        try:
            wait_ready(self.proc, f"http://127.0.0.1:{self.port}", timeout_s=timeout, poll_s=0.1)
        except LocalRunError as exc:
            self.log.seek(0)
            raise RuntimeError(f"{exc}: {self.log.read()[-2000:]}") from None

    def batch_stats(self) -> tuple[float, float]:
        """(samples, engine calls) so far, from the server's own metrics."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=60).text
        vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in ("optimodel_batch_size_sum", "optimodel_batch_size_count")}
        return vals.get("optimodel_batch_size_sum", 0), vals.get("optimodel_batch_size_count", 0)

    def wait_idle(self, timeout: float = 60) -> None:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=60).text
            inflight = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                        if s.name == "optimodel_inflight_requests"]
            if not inflight or inflight[0] == 0:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def set_config(path: Path, **kw) -> None:
    write_batching_config(path, BatchingConfig(**kw))
    time.sleep(0.6)  # the server polls every 200 ms


async def overhead(client: Client, backend, data: list[dict], reqs: list[bytes], n: int) -> dict:
    """Alternate one engine call and one server request on the same input, n times each."""
    engine_ms, server_ms = [], []
    for i in range(n):
        feeds = data[i % len(data)]
        t0 = time.perf_counter()
        backend.run(feeds)
        engine_ms.append((time.perf_counter() - t0) * 1000)
        server_ms.extend(await closed_loop_latencies(client, reqs[i % len(reqs)], 1))
    e50, s50 = float(np.median(engine_ms)), float(np.median(server_ms))
    paired = float(np.median(np.array(server_ms) - np.array(engine_ms)))
    return {"n": n, "engine_p50_ms": round(e50, 3), "server_p50_ms": round(s50, 3),
            "overhead_p50_ms": round(s50 - e50, 3), "overhead_paired_median_ms": round(paired, 3)}


async def bench_model(model: str, workdir: Path, threads: int, quick: bool) -> dict:
    cfg = MODELS[model]
    artifact = make_artifact(model, workdir)
    data = samples(model)
    backend = raw_engine(artifact, threads)
    secs = 1.5 if quick else 3.0
    a_tput, _, a_cpu_ms = engine_throughput(backend, data, cfg["max_batch"], secs)
    b1_tput, b1_ms, _ = engine_throughput(backend, data, 1, secs / 2)
    call_ms = cfg["max_batch"] / a_tput * 1000
    # a batch-filling server answers within ~2 engine calls of arrival at saturation; 4 calls leaves room
    slo = cfg["slo_ms"] or float(round(max(4 * call_ms, 50.0), -1))
    print(f"[{model}] raw engine: {a_tput:.0f} samples/s at batch {cfg['max_batch']} ({call_ms:.2f} ms/call), "
          f"{b1_tput:.0f}/s at batch 1 ({b1_ms:.2f} ms/call); SLO p99 < {slo:g} ms", flush=True)

    config = workdir / f"{model}-batching.json"
    write_batching_config(config, BatchingConfig(max_wait_ms=0, max_batch_size=cfg["max_batch"], max_queue=2048))
    port = free_port()
    server = ServerProcess(artifact, config, port, threads)
    try:
        server.wait_ready()
        reqs = [binary_request("127.0.0.1", port, model, d) for d in data]
        client = Client("127.0.0.1", port)
        await client.connect(256)
        # (d) overhead at batch 1, maxWaitMs 0
        await closed_loop_latencies(client, reqs[0], 50)
        n_overhead = int(min(400, max(60, 8000 / max(b1_ms, 0.01)))) // (2 if quick else 1)
        d = await overhead(client, backend, data, reqs, n_overhead)
        print(f"[{model}] overhead at batch 1: server p50 {d['server_p50_ms']} ms - engine p50 "
              f"{d['engine_p50_ms']} ms = {d['overhead_p50_ms']} ms", flush=True)

        # (b) open-loop sweep with batching on
        set_config(config, max_wait_ms=cfg["max_wait_ms"], max_batch_size=cfg["max_batch"], max_queue=2048)
        # finer steps where the knee was on this box in earlier runs
        fractions = (0.2, 0.3, 0.35, 0.4, 0.45, 0.6, 0.8) if model == "digits" else (0.6, 0.75, 0.85, 0.9, 0.95, 1.0)
        rates = [round(f * a_tput, 1) for f in (fractions if not quick else fractions[1::2])]
        duration = (3.0 if quick else 5.0) * (2 if model == "minilm" else 1)
        sweep, best = [], None
        grace = max(5.0, 2 * slo / 1000)
        for rate in rates:
            server.wait_idle()  # a level must not inherit the previous level's queue
            before, cpu0 = server.batch_stats(), cpu_seconds(server.proc.pid)
            r = await open_loop(client, reqs, rate, duration, max_requests=int(rate * duration) + 1, grace_s=grace)
            after, cpu1 = server.batch_stats(), cpu_seconds(server.proc.pid)
            fill = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            # the whole server process (event loop + engine) per answered sample: robust to other
            # tenants' load, unlike wall-clock throughput (clock ticks are 10 ms: long runs only)
            cpu_ms = (cpu1 - cpu0) / max(1, r.ok) * 1000
            s = r.summary() | {"batch_fill": round(fill, 2), "server_cpu_ms_per_sample": round(cpu_ms, 3)}
            sweep.append(s)
            ok = r.pct(99) < slo and r.rejected == 0 and r.errors == 0
            print(f"[{model}]   rate {rate:7.1f}/s -> {r.throughput:7.1f}/s  p50 {r.pct(50):8.2f} ms  "
                  f"p99 {r.pct(99):8.2f} ms  503s {r.rejected}  err {r.errors}  batch fill {s['batch_fill']}  "
                  f"cpu {cpu_ms:.3f} ms/sample  "
                  f"{'within' if ok else 'over'} SLO",
                  flush=True)
            if ok and (best is None or r.throughput > best["throughput"]):
                best = s
            if not ok and r.pct(50) > 10 * slo:
                break  # far past saturation: higher rates only queue more
        b_tput = best["throughput"] if best else 0.0
        # (c) the best rate again, batching on and off (maxBatchSize 1, switched live through the
        # config file), alternated twice so both see the same machine; other tenants' load makes
        # any single p99 noisy, so the medians of the two runs are reported
        rate_c = best["rate"] if best else rates[0]
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for label, max_bs in (("on", cfg["max_batch"]), ("off", 1)) * 2:
            set_config(config, max_wait_ms=cfg["max_wait_ms"] if max_bs > 1 else 0, max_batch_size=max_bs,
                       max_queue=2048)
            server.wait_idle()
            before = server.batch_stats()
            run = (await open_loop(client, reqs, rate_c, duration, max_requests=int(rate_c * duration) + 1,
                                   grace_s=grace, seed=len(runs[label]))).summary()
            after = server.batch_stats()
            run["batch_fill"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)
            runs[label].append(run)

        def med(label: str) -> dict:
            rs = runs[label]
            p99s = [r["p99_ms"] if r["p99_ms"] is not None else float("inf") for r in rs]
            return {"rate": rate_c, "runs": rs, "p99_ms_median": float(np.median(p99s)),
                    "p50_ms_median": float(np.median([r["p50_ms"] or float("inf") for r in rs])),
                    "throughput_median": round(float(np.median([r["throughput"] for r in rs])), 1),
                    "rejected": sum(r["rejected"] for r in rs), "errors": sum(r["errors"] for r in rs)}

        on, off = med("on"), med("off")
        # (e) the peers' setup (issue 4): 32 concurrent users of tiny requests, closed loop, batching on
        peers = None
        if model == "digits":
            set_config(config, max_wait_ms=cfg["max_wait_ms"], max_batch_size=cfg["max_batch"], max_queue=2048)
            server.wait_idle()
            peers = await concurrent_closed_loop(client, reqs, 32, 3.0 if quick else 5.0)
            print(f"[{model}] 32 concurrent users, closed loop: {peers['throughput']}/s, p50 {peers['p50_ms']} ms, "
                  f"p99 {peers['p99_ms']} ms, errors {peers['errors']}", flush=True)
        print(f"[{model}] batching on vs off at {rate_c:.0f}/s (median of 2 runs each): p99 {on['p99_ms_median']:.2f} "
              f"vs {off['p99_ms_median']:.2f} ms, p50 {on['p50_ms_median']:.2f} vs {off['p50_ms_median']:.2f} ms, "
              f"throughput {on['throughput_median']} vs {off['throughput_median']}/s, 503s {on['rejected']} vs "
              f"{off['rejected']}", flush=True)
        await client.close()
    finally:
        server.stop()
    # the machine is shared: measure the raw engine again after the server phases and use the mean
    a_after, _, a_cpu_after = engine_throughput(backend, data, cfg["max_batch"], secs)
    backend.close()
    a_mean = (a_tput + a_after) / 2
    eff = b_tput / a_mean if a_mean else 0.0
    top = max(sweep, key=lambda x: x["throughput"])
    cpu_eff = min(a_cpu_ms, a_cpu_after) / top["server_cpu_ms_per_sample"] if top["server_cpu_ms_per_sample"] else 0
    print(f"[{model}] (a) raw {a_tput:.0f}/s before, {a_after:.0f}/s after the server runs; (b) {b_tput:.0f}/s within "
          f"SLO: efficiency b/a {eff:.3f}; CPU efficiency (raw engine CPU per sample / whole server CPU per "
          f"sample at its top rate) {cpu_eff:.3f}", flush=True)
    return {"threads": threads, "slo_p99_ms": slo, "max_batch": cfg["max_batch"],
            "a_raw_samples_per_s": round(a_mean, 1), "a_before": round(a_tput, 1), "a_after": round(a_after, 1),
            "raw_cpu_ms_per_sample": round(min(a_cpu_ms, a_cpu_after), 3), "cpu_efficiency": round(cpu_eff, 3),
            "raw_ms_per_call_at_max_batch": round(call_ms, 3),
            "raw_batch1_per_s": round(b1_tput, 1),
            "b_server_per_s_within_slo": round(b_tput, 1), "efficiency_b_over_a": round(eff, 3),
            "c_batching_on": on, "c_batching_off": off, "d_overhead": d, "e_32_concurrent": peers, "sweep": sweep}


MLP = {"max_batch": 32, "max_wait_ms": 5.0, "slo_ms": 50.0, "cpu_rate": 2000.0}


def json_request(host: str, port: int, model: str, feeds: dict[str, np.ndarray]) -> bytes:
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    body = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": dt[v.dtype],
                                   "data": v.ravel().tolist()} for k, v in feeds.items()]}).encode()
    return http_request(host, port, f"/v2/models/{model}/infer", body)


def mlp_artifact(workdir: Path, hidden: int = 1024, max_batch: int = MLP["max_batch"]) -> Path:
    from _mlp import make_mlp_onnx

    src = workdir / f"mlp{hidden}-src"
    make_mlp_onnx(src / "model.onnx", hidden=hidden)
    manifest = Manifest(cache_key="bench" + "1" * 59, model_name="mlp", arch="cpu",
                        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
                        inputs=[_spec("x", "float32", [-1, 256])], outputs=[_spec("y", "float32", [-1, 10])],
                        max_batch_size=max_batch, versions={}, files=[])
    dest = workdir / "store" / f"mlp{hidden}"
    publish(src, manifest, dest.as_uri())
    return dest


class GrpcClient:
    """open_loop's client interface over gRPC: pre-serialized ModelInferRequest bytes in, (status, body) out."""

    def __init__(self, port: int):
        import grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        # bytes straight through: the client does not re-serialize per request
        self.call = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def connect(self, n: int) -> None:
        await self.channel.channel_ready()

    async def send(self, request: bytes) -> tuple[int, bytes]:
        try:
            return 200, await self.call(request)
        except self.grpc.aio.AioRpcError as exc:
            return (503 if exc.code() == self.grpc.StatusCode.UNAVAILABLE else 500), b""

    async def close(self) -> None:
        await self.channel.close()


def grpc_request(model: str, feeds: dict[str, np.ndarray]) -> bytes:
    from serving_image.grpc_v2 import grpc_predict_v2_pb2 as pb

    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    req = pb.ModelInferRequest(model_name=model)
    for k, v in feeds.items():
        req.inputs.add(name=k, datatype=dt[v.dtype], shape=list(v.shape))
        req.raw_input_contents.append(np.ascontiguousarray(v).tobytes())
    return req.SerializeToString()


async def max_rate(port: int, reqs: list[bytes], slo: float, duration: float, start: float, step: float = 1.2,
                   label: str = "", server: "ServerProcess | None" = None, limit: float = 40_000,
                   client=None) -> dict:
    """Highest open-loop rate (geometric steps) whose p99 over every request stays within slo, nothing refused."""
    client = client or Client("127.0.0.1", port)
    await client.connect(64)
    best, sweep, rate, retried = None, [], start, False
    while rate <= limit:
        if server is not None:
            server.wait_idle()
        r = await open_loop(client, reqs, rate, duration, max_requests=int(rate * duration) + 1, grace_s=5.0)
        ok = r.pct(99) <= slo and r.rejected == 0 and r.errors == 0
        sweep.append(r.summary())
        print(f"[mlp] {label:>16} rate {rate:7.0f}/s -> {r.throughput:7.0f}/s p99 {r.pct(99):8.2f} ms "
              f"503s {r.rejected} err {r.errors} {'within' if ok else 'over'}", flush=True)
        if not ok:
            if retried:
                break
            retried = True  # one more try at the same rate: other tenants' bursts spike single runs here
            await asyncio.sleep(1.0)
            continue
        best, retried = r.summary(), False
        rate = round(rate * step, -1)
    await client.close()
    return {"max_rate_within_slo": best["rate"] if best else 0.0, "best": best, "sweep": sweep}


async def cpu_per_request(server: "ServerProcess", reqs: list[bytes], rate: float, duration: float,
                          client=None) -> dict:
    """Whole server process CPU time / answered requests at a fixed open-loop rate."""
    client = client or Client("127.0.0.1", server.port)
    await client.connect(64)
    server.wait_idle()
    cpu_s = getattr(server, "cpu_s", None) or (lambda: cpu_seconds(server.proc.pid))
    cpu0 = cpu_s()
    r = await open_loop(client, reqs, rate, duration, max_requests=int(rate * duration) + 1, grace_s=5.0)
    cpu1 = cpu_s()
    await client.close()
    return {"rate": rate, "ok": r.ok, "errors": r.errors, "rejected": r.rejected,
            "cpu_us_per_request": round((cpu1 - cpu0) / max(1, r.ok) * 1e6, 1), "p99_ms": r.summary()["p99_ms"]}


def engine_stats(port: int) -> dict[str, float]:
    """The server's own engine counters: compute seconds and samples, and engine calls, so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    want = ("optimodel_compute_seconds_sum", "optimodel_compute_seconds_count", "optimodel_batch_size_sum")
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name in want:
                out[s.name] = s.value
            elif s.name == "optimodel_request_latency_seconds_bucket":
                out[f"le {s.labels['le']}"] = s.value
    return out


def server_p99_ms(e0: dict, e1: dict) -> float | None:
    """p99 of the answered requests as the server saw them (handler entry to response), bucket upper bound."""
    buckets = sorted((float(k[3:]), e1[k] - e0.get(k, 0)) for k in e1 if k.startswith("le "))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(round(le * 1000, 1) for le, n in buckets if n >= 0.99 * total)


async def overload(server: "ServerProcess", reqs: list[bytes], capacity: float, slo: float, duration: float,
                   ok_cpu_us: float | None = None) -> dict:
    """10x capacity offered open loop: answered-within-SLO per second as a fraction of capacity.

    Also what the overload cost the server: its CPU, the engine's busy share and batch time (from its
    own metrics), and with ok_cpu_us (the CPU of one answered request, measured without overload) the
    CPU of one 503 refusal: (server CPU - answered x ok_cpu_us) / refused.
    """
    client = Client("127.0.0.1", server.port, max_connections=1000)
    await client.connect(256)
    server.wait_idle()
    offered = 10 * capacity
    e0, cpu0, t0 = engine_stats(server.port), cpu_seconds(server.proc.pid), time.perf_counter()
    client0 = time.process_time()  # this process is the load generator
    # latency from the real send: at 10x this client cannot keep the schedule (its ceiling is printed),
    # and its own lag would otherwise count against the server
    r = await open_loop(client, reqs, offered, duration, max_requests=int(offered * duration) + 1, grace_s=10.0,
                        from_send=True)
    cpu1, wall, client1 = cpu_seconds(server.proc.pid), time.perf_counter() - t0, time.process_time()
    e1 = engine_stats(server.port)
    await client.close()
    calls = e1.get("optimodel_compute_seconds_count", 0) - e0.get("optimodel_compute_seconds_count", 0)
    compute = e1.get("optimodel_compute_seconds_sum", 0) - e0.get("optimodel_compute_seconds_sum", 0)
    samples = e1.get("optimodel_batch_size_sum", 0) - e0.get("optimodel_batch_size_sum", 0)
    cost = {"server_cpu_cores": round((cpu1 - cpu0) / wall, 2), "client_cpu_cores": round((client1 - client0) / wall, 2),
            "engine_busy_share": round(compute / wall, 2),
            "engine_batch_ms": round(compute / max(1, calls) * 1000, 2),
            "engine_samples_per_batch": round(samples / max(1, calls), 2), "server_p99_ms": server_p99_ms(e0, e1)}
    if ok_cpu_us is not None and r.rejected >= 0.1 * r.scheduled:  # else the refusals' share is noise
        refusal = ((cpu1 - cpu0) * 1e6 - r.ok * ok_cpu_us) / r.rejected
        cost["refusal_cpu_us"] = round(refusal, 1)
        # the physical ceiling: the cores the client leaves at the rate it sent (of all this box has) must
        # pay for refusing what is not answered; answered g/s and refused (sent - g)/s cost
        # g*ok + (sent - g)*refusal. Other tenants' load is not subtracted: a ceiling, not a forecast
        sent = r.scheduled / max(r.send_s, 1e-9)
        client_us = (client1 - client0) * 1e6 / max(1, r.scheduled)
        left = len(os.sched_getaffinity(0)) * 1e6 - sent * client_us
        cost["client_cpu_us_per_request"] = round(client_us, 1)
        if ok_cpu_us > refusal > 0:
            cost["ceiling_answered_per_s"] = round(max(0.0, (left - sent * refusal) / (ok_cpu_us - refusal)), 1)
            # the highest offered rate at which the box could still answer `capacity` and refuse the rest
            ncpu = len(os.sched_getaffinity(0)) * 1e6
            cost["max_offered_at_full_goodput_per_s"] = round(
                (ncpu - capacity * (ok_cpu_us - refusal)) / (client_us + refusal), 1)
    lat = np.array(r.latencies_ms) if r.latencies_ms else np.array([float("inf")])
    within = int((lat <= slo).sum())
    window = max(duration, r.send_s)
    # goodput against the capacity measured in this run; offered is what was scheduled, sent what went out
    return {"offered_per_s": round(offered, 1), "sent_per_s": round(r.scheduled / max(r.send_s, 1e-9), 1),
            "scheduled": r.scheduled, "ok": r.ok, "rejected_503": r.rejected, "errors": r.errors,
            "unanswered": r.unanswered,
            "goodput_within_slo_per_s": round(within / window, 1),
            "goodput_fraction_of_capacity": round(within / window / capacity, 3) if capacity else 0.0,
            "p99_answered_ms": round(float(np.percentile(lat, 99)), 2),
            "share_503": round(r.rejected / max(1, r.scheduled), 3), **cost}


async def overload_engine_bound(workdir: Path, data: list[dict], duration: float) -> dict:
    """10x overload on a wide MLP (hidden 8192, batch 8) whose engine, not the loop, sets capacity."""
    artifact = mlp_artifact(workdir, hidden=8192, max_batch=8)
    config = workdir / "wide-batching.json"
    write_batching_config(config, BatchingConfig(max_wait_ms=5, max_batch_size=8, max_queue=4096))
    out: dict = {}
    port = free_port()
    server = ServerProcess(artifact, config, port, None)
    try:
        server.wait_ready()
        reqs = [binary_request("127.0.0.1", port, "mlp", d) for d in data]
        call_ms = await batch_ms(server)
        slo = float(max(50.0, round(4 * call_ms, -1)))
        out["batch_ms"], out["slo_p99_ms"] = round(call_ms, 2), slo
        out["capacity"] = await max_rate(port, reqs, slo, duration, 40, 1.2, "wide capacity", server)
    finally:
        server.stop()
    capacity = out["capacity"]["max_rate_within_slo"]
    for label, extra in (("deadline_slo", ("--deadline-ms", f"{slo:g}")), ("deadline_default", ())):
        port = free_port()
        server = ServerProcess(artifact, config, port, None, extra)
        try:
            server.wait_ready()
            reqs = [binary_request("127.0.0.1", port, "mlp", d) for d in data]
            fig = await overload(server, reqs, capacity, slo, 2 * duration)
        finally:
            server.stop()
        out[label] = fig
        print(f"[mlp] engine-bound overload ({label}; batch 8 of the wide MLP {call_ms:.1f} ms, SLO {slo:g} ms, "
              f"capacity {capacity:.0f}/s) offered {fig['offered_per_s']:.0f}/s (sent {fig['sent_per_s']:.0f}/s): "
              f"answered within SLO {fig['goodput_within_slo_per_s']:.0f}/s = {fig['goodput_fraction_of_capacity']:.2f} "
              f"of capacity, p99 of answered {fig['p99_answered_ms']} ms, 503 share {fig['share_503']}; engine busy "
              f"{fig['engine_busy_share']:.2f}, {fig['engine_samples_per_batch']} samples/batch in "
              f"{fig['engine_batch_ms']} ms; server CPU {fig['server_cpu_cores']} cores; p99 in the server "
              f"{fig['server_p99_ms']} ms", flush=True)
    return out


async def batch_ms(server: "ServerProcess") -> float:
    """Mean engine time of one full batch, from the server's own metrics after a burst."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    # warm-up batches are not in the histogram: time a few full batches first
    client = Client("127.0.0.1", server.port)
    rng = np.random.default_rng(1)
    body = binary_request("127.0.0.1", server.port, "mlp", {"x": rng.standard_normal((8, 256), dtype=np.float32)})
    for _ in range(5):
        await client.send(body)
    await client.close()
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=60).text
    vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in ("optimodel_compute_seconds_sum", "optimodel_compute_seconds_count")}
    return vals["optimodel_compute_seconds_sum"] / max(1, vals["optimodel_compute_seconds_count"]) * 1000


async def bench_torchserve(workdir: Path, data: list[dict], slo: float, duration: float) -> dict:
    """TorchServe 0.12 on the same ONNX MLP (its own venv): max rate at the SLO and CPU per request."""
    from _torchserve import TorchServeProcess, available

    why = available()
    if why is not None:
        print(f"[mlp] TorchServe not measured: {why}", flush=True)
        return {"not_measured": why}
    ts = TorchServeProcess(workdir / "mlp1024-src" / "model.onnx", workdir, MLP["max_batch"], MLP["max_wait_ms"])
    try:
        ts.wait_ready()
        # TorchServe's own API: the raw FP32 input as the body, the logits as JSON
        reqs = [http_request("127.0.0.1", ts.port, "/predictions/mlp", np.ascontiguousarray(d["x"]).tobytes())
                for d in data]
        fig = await max_rate(ts.port, reqs, slo, duration, 100, 1.25, "torchserve", ts)
        fig["cpu_binary"] = await cpu_per_request(ts, reqs, MLP["cpu_rate"], duration)
    finally:
        ts.stop()
    print(f"[mlp] TorchServe 0.12 (1 worker, ONNX Runtime 1 thread, batch {MLP['max_batch']}, delay "
          f"{MLP['max_wait_ms']:g} ms): max rate within p99 {slo:g} ms {fig['max_rate_within_slo']:.0f}/s; CPU per "
          f"request at {MLP['cpu_rate']:.0f}/s {fig['cpu_binary']['cpu_us_per_request']} us (JVM + worker)", flush=True)
    return fig


async def bench_mlp(workdir: Path, quick: bool, torchserve: bool = False) -> dict:
    """Issue 11's proof on the MLP: default threads vs others, CPU per request, overload, the client's ceiling."""
    from optimodel.cpu import cpu_quota
    from serving_image.backends import default_engine_threads

    slo, duration = MLP["slo_ms"], (2.0 if quick else 3.0)
    artifact = mlp_artifact(workdir)
    config = workdir / "mlp-batching.json"
    write_batching_config(config, BatchingConfig(max_wait_ms=MLP["max_wait_ms"], max_batch_size=MLP["max_batch"],
                                                 max_queue=4096))
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 256), dtype=np.float32)} for _ in range(256)]
    quota, default = cpu_quota(), default_engine_threads()
    out: dict = {"cpu_quota": quota, "default_threads": default, "slo_p99_ms": slo}
    print(f"[mlp] CPU quota {quota}: default engine threads {default}", flush=True)

    # the load generator's own ceiling, against a server that does nothing
    port = free_port()
    null = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_null_server.py"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        null.stdout.readline()
        reqs = [binary_request("127.0.0.1", port, "mlp", d) for d in data]
        out["loadgen_ceiling"] = await max_rate(port, reqs, slo, duration, 1000, 1.3, "null server")
    finally:
        null.terminate()
        null.wait()

    # max rate at the SLO: the default, and each other thread count up to the quota (1 is the default here
    # when the quota is 2; then 2, the quota, is the alternative)
    settings = [None] + [t for t in sorted({1, quota}) if t != default]
    out["threads"] = {}
    for threads in settings:
        label = f"threads {'default' if threads is None else threads}"
        port, grpc_port = free_port(), free_port()
        server = ServerProcess(artifact, config, port, threads, ("--grpc-port", str(grpc_port)))
        try:
            server.wait_ready()
            reqs_bin = [binary_request("127.0.0.1", port, "mlp", d) for d in data]
            reqs_json = [json_request("127.0.0.1", port, "mlp", d) for d in data]
            reqs_grpc = [grpc_request("mlp", d) for d in data]
            fig = await max_rate(port, reqs_bin, slo, duration, 400, 1.2, label, server)
            fig["cpu_json"] = await cpu_per_request(server, reqs_json, MLP["cpu_rate"], duration)
            fig["cpu_binary"] = await cpu_per_request(server, reqs_bin, MLP["cpu_rate"], duration)
            print(f"[mlp] {label}: max rate within p99 {slo:g} ms {fig['max_rate_within_slo']:.0f}/s; server CPU "
                  f"per request at {MLP['cpu_rate']:.0f}/s: JSON {fig['cpu_json']['cpu_us_per_request']} us, binary "
                  f"{fig['cpu_binary']['cpu_us_per_request']} us", flush=True)
            if threads is None:  # gRPC beside REST, default threads
                fig["grpc"] = await max_rate(port, reqs_grpc, slo, duration, 400, 1.2, "grpc " + label, server,
                                             client=GrpcClient(grpc_port))
                fig["cpu_grpc"] = await cpu_per_request(server, reqs_grpc, MLP["cpu_rate"], duration,
                                                        client=GrpcClient(grpc_port))
                print(f"[mlp] gRPC {label}: max rate within p99 {slo:g} ms {fig['grpc']['max_rate_within_slo']:.0f}/s; "
                      f"server CPU per request at {MLP['cpu_rate']:.0f}/s {fig['cpu_grpc']['cpu_us_per_request']} us",
                      flush=True)
        finally:
            server.stop()
        out["threads"]["default" if threads is None else str(threads)] = fig

    if torchserve:
        out["torchserve"] = await bench_torchserve(workdir, data, slo, duration)

    # overload: 10x the default's capacity, deadline = the SLO, and the default deadline beside it
    capacity = out["threads"]["default"]["max_rate_within_slo"]
    out["overload"] = {}
    for label, extra in (("deadline_slo", ("--deadline-ms", f"{slo:g}")), ("deadline_default", ())):
        port = free_port()
        server = ServerProcess(artifact, config, port, None, extra)
        try:
            server.wait_ready()
            reqs_bin = [binary_request("127.0.0.1", port, "mlp", d) for d in data]
            fig = await overload(server, reqs_bin, capacity, slo, duration,
                                 ok_cpu_us=out["threads"]["default"]["cpu_binary"]["cpu_us_per_request"])
        finally:
            server.stop()
        if "ceiling_answered_per_s" in fig:
            fig["ceiling_fraction_of_capacity"] = round(min(capacity, fig["ceiling_answered_per_s"]) / capacity, 3)
        out["overload"][label] = fig
        print(f"[mlp] overload ({label}) offered {fig['offered_per_s']:.0f}/s (client sent "
              f"{fig['sent_per_s']:.0f}/s): answered within SLO {fig['goodput_within_slo_per_s']:.0f}/s = "
              f"{fig['goodput_fraction_of_capacity']:.2f} of capacity, p99 of answered {fig['p99_answered_ms']} ms, "
              f"503 share {fig['share_503']}; a refusal costs {fig.get('refusal_cpu_us')} us of server CPU, the client "
              f"{fig.get('client_cpu_us_per_request')} us per request sent: physical ceiling "
              f"{fig.get('ceiling_answered_per_s')} answered/s = {fig.get('ceiling_fraction_of_capacity')} of capacity",
              flush=True)

    # the same overload where the engine, not the event loop, is the bottleneck: on 2 shared cores the
    # MLP's capacity is the loop's, and at 10x even refusing costs more loop time than there is
    out["overload_engine_bound"] = await overload_engine_bound(workdir, data, duration)

    rates = {k: v["max_rate_within_slo"] for k, v in out["threads"].items()}
    ceiling = out["loadgen_ceiling"]["max_rate_within_slo"]
    cpu_json = out["threads"]["default"]["cpu_json"]["cpu_us_per_request"]
    cpu_bin = out["threads"]["default"]["cpu_binary"]["cpu_us_per_request"]
    out["targets"] = {
        "default_threads_within_5pct_of_best": rates["default"] >= 0.95 * max(rates.values()),
        "cpu_per_request_json_le_120us": cpu_json <= 120,
        "cpu_binary_below_json": cpu_bin < cpu_json,
        "overload_goodput_ge_0.9_of_capacity": out["overload"]["deadline_slo"]["goodput_fraction_of_capacity"] >= 0.9,
        # what the box allows once refusals are paid for (issue: "measure the real ceiling here")
        "overload_goodput_of_physical_ceiling": (
            round(out["overload"]["deadline_slo"]["goodput_fraction_of_capacity"]
                  / out["overload"]["deadline_slo"]["ceiling_fraction_of_capacity"], 2)
            if out["overload"]["deadline_slo"].get("ceiling_fraction_of_capacity")
            else "ceiling 0: the client and refusing alone need more CPU than the box has" if
            out["overload"]["deadline_slo"].get("ceiling_fraction_of_capacity") == 0 else "not measured"),
        "overload_max_offered_at_full_goodput_per_s": out["overload"]["deadline_slo"].get(
            "max_offered_at_full_goodput_per_s", "not measured"),
        "overload_engine_bound_goodput_ge_0.9": (
            out["overload_engine_bound"]["deadline_slo"]["goodput_fraction_of_capacity"] >= 0.9),
        "grpc_cpu_per_request_us": out["threads"]["default"]["cpu_grpc"]["cpu_us_per_request"],
        "torchserve_1.5x": (rates["default"] >= 1.5 * out["torchserve"]["max_rate_within_slo"]
                            if "max_rate_within_slo" in out.get("torchserve", {})
                            else "not measured (--torchserve; quote CPU per request instead)"),
    }
    out["loadgen_is_the_limit"] = bool(ceiling and max(rates.values()) >= 0.8 * ceiling)
    for k, v in out["targets"].items():
        print(f"[mlp] target {k}: {str(v).lower() if isinstance(v, bool) else v}", flush=True)
    print(f"[mlp] load generator ceiling (do-nothing server) {ceiling:.0f}/s; best server rate "
          f"{max(rates.values()):.0f}/s; the client {'is' if out['loadgen_is_the_limit'] else 'is not'} the limit",
          flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,digits,minilm")
    p.add_argument("--threads", type=int, default=1,
                   help="engine threads for the raw engine and the server alike (default 1: this box has 2 "
                        "shared cores, and the server's event loop and the load generator need one)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--torchserve", action="store_true",
                   help="mlp: TorchServe 0.12 beside ours (needs build/ts-venv: make torchserve-venv, and Java 17)")
    args = p.parse_args()
    import resource

    # the overload run holds thousands of connections open at once (client and server inherit this)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    figures = {"bench": "serving", "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
               "cpu_model": cpu_model()}
    print(f"CPU: {figures['cpu_model']}; {figures['cpus']} CPUs; load average {figures['load_avg']:.2f}", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optimodel-bench-") as tmp:
        for model in args.models.split(","):
            if model == "mlp":
                figures[model] = asyncio.run(bench_mlp(Path(tmp), args.quick, args.torchserve))
            else:
                figures[model] = asyncio.run(bench_model(model, Path(tmp), args.threads, args.quick))
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    figures["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(_finite(figures), separators=(",", ":"), allow_nan=False))


def cpu_model() -> str:
    """lscpu's model name and whether the CPU has VNNI (int8 dot products)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    vnni = "vnni" in text
    return f"{name} (vnni: {'yes' if vnni else 'no'})"


def _finite(obj):
    """JSON has no Infinity/NaN: a p99 that never arrived (unanswered requests) becomes null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
