"""The HTTP stack's floor: server CPU per request of do-nothing servers beside ours, in one run.

Same client (bench/_loadgen.py, open loop), same JSON request as the MLP bench (256 floats, ~5 kB),
same rate (2,000 req/s by default). Each server answers a fixed JSON body after reading the whole
request; CPU is the whole server process tree's (utime + stime from /proc), divided by answered
requests. Servers are measured round-robin, `--rounds` times each, and the median is printed, so
every one sees the same machine load. What it tells: how much of our CPU per request is the HTTP
stack itself, and what another stack would save. The gRPC kinds (a do-nothing grpc.aio ModelInfer,
and our server's gRPC port) send the same tensor as a binary ModelInferRequest.

Usage: python bench/http_floor.py [--rate 2000] [--seconds 3] [--rounds 3] [--kinds uvicorn,granian-asgi,...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _loadgen import Client, open_loop  # noqa: E402
from _proc import free_port, tree_cpu_s  # noqa: E402

KINDS = ("uvicorn", "granian-asgi", "granian-rsgi", "httptools", "optimodel-http", "optimodel", "grpc-aio",
         "optimodel-grpc")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class Started:
    def __init__(self, kind: str, workdir: Path):
        self.port = free_port()
        self.grpc = kind in ("grpc-aio", "optimodel-grpc")
        if kind in ("optimodel", "optimodel-grpc"):
            from serving import MLP, ServerProcess, mlp_artifact
            from optimodel.batching import BatchingConfig, write_batching_config

            store = workdir / "store" / "mlp1024"
            artifact = store if store.exists() else mlp_artifact(workdir)
            config = workdir / "batching.json"
            write_batching_config(config, BatchingConfig(max_wait_ms=MLP["max_wait_ms"],
                                                         max_batch_size=MLP["max_batch"], max_queue=4096))
            extra = ()
            if kind == "optimodel-grpc":
                self.http_port, self.port = self.port, free_port()
                extra = ("--grpc-port", str(self.port))
            self.server = ServerProcess(artifact, config, getattr(self, "http_port", self.port), None, extra)
            self.server.wait_ready()
            self.proc = self.server.proc
        else:
            self.server = None
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_http_floor_apps.py"), kind,
                                          str(self.port)], cwd=ROOT / "bench", stdout=subprocess.DEVNULL)
            wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def json_request(port: int) -> list[bytes]:
    from _loadgen import http_request

    rng = np.random.default_rng(0)
    out = []
    for _ in range(64):
        x = rng.standard_normal(256, dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                       "data": x.tolist()}]}).encode()
        out.append(http_request("127.0.0.1", port, "/v2/models/mlp/infer", body))
    return out


def grpc_requests() -> list[bytes]:
    from serving import grpc_request

    rng = np.random.default_rng(0)
    return [grpc_request("mlp", {"x": rng.standard_normal((1, 256), dtype=np.float32)}) for _ in range(64)]


async def measure(server: Started, rate: float, seconds: float, seed: int) -> dict:
    if server.grpc:
        from serving import GrpcClient

        client, reqs = GrpcClient(server.port), grpc_requests()
    else:
        client, reqs = Client("127.0.0.1", server.port), json_request(server.port)
    await client.connect(32)
    await open_loop(client, reqs, rate, 0.5, max_requests=int(rate), seed=seed + 100)  # warm the connections
    cpu0 = tree_cpu_s(server.proc.pid)
    r = await open_loop(client, reqs, rate, seconds, max_requests=int(rate * seconds) + 1, seed=seed)
    cpu1 = tree_cpu_s(server.proc.pid)
    await client.close()
    return {"ok": r.ok, "errors": r.errors, "rejected": r.rejected, "p99_ms": r.summary()["p99_ms"],
            "cpu_us_per_request": (cpu1 - cpu0) / max(1, r.ok) * 1e6}


async def run(kinds: list[str], rate: float, seconds: float, rounds: int) -> dict:
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="optimodel-httpfloor-") as tmp:
        for rnd in range(rounds):
            for kind in kinds:
                try:
                    server = Started(kind, Path(tmp))
                except Exception as exc:  # one stack not starting must not hide the others' figures
                    print(f"[http-floor] {kind}: did not start: {exc}", flush=True)
                    continue
                try:
                    fig = await measure(server, rate, seconds, rnd)
                finally:
                    server.stop()
                results[kind].append(fig)
                print(f"[http-floor] round {rnd + 1} {kind:>12}: {fig['cpu_us_per_request']:6.1f} us CPU/request "
                      f"(ok {fig['ok']}, err {fig['errors']}, p99 {fig['p99_ms']} ms)", flush=True)
    summary = {}
    for kind, figs in results.items():
        if figs:
            summary[kind] = {"cpu_us_per_request_median": round(float(np.median([f["cpu_us_per_request"]
                                                                                 for f in figs])), 1),
                             "runs": figs}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS))
    args = p.parse_args()
    import uvloop

    from serving import cpu_model

    print(f"CPU: {cpu_model()}; {len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    summary = uvloop.run(run(args.kinds.split(","), args.rate, args.seconds, args.rounds))
    for kind, fig in summary.items():
        print(f"[http-floor] {kind:>12}: median {fig['cpu_us_per_request_median']} us CPU/request at "
              f"{args.rate:.0f} req/s {'gRPC' if 'grpc' in kind else 'JSON'}", flush=True)
    print(json.dumps({"bench": "http_floor", "cpu_model": cpu_model(), "rate": args.rate,
                      "load_avg_end": os.getloadavg()[0], "figures": summary}, separators=(",", ":")))


if __name__ == "__main__":
    main()
