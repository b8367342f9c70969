"""Operator at fleet scale: N OptimizedModels on a 3-architecture GPU fleet.

The API server is the kmock-based emulator of the operator tests, served over
HTTP from this process; the operator runs as its own process
(`python -m optimodel_operator`), so its memory is measured alone. Figures:
seconds from creating the models until every model has its builder Jobs (one
per architecture), API requests the operator made per model up to then and after
everything settled, and the operator's resident memory. With rollout on (the
default) it also plays the Job controller (every build succeeds and publishes a
tiny artifact) and times until every model has its Deployments.

    python bench/operator.py [--models 200] [--no-rollout]

The last line printed is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from kube_emulator import Emulator  # noqa: E402
from operator_helpers import (A100, H100, L4, NS, OM, TOOLCHAIN, finish_job, gpu_node,  # noqa: E402
                              make_available, model)

import kmock  # noqa: E402


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024





def operator_requests(emu: Emulator) -> int:
    # everything on the wire came from the operator; the bench writes in-process
    return len(emu._requests)


def request_kinds(emu: Emulator, since: int, models: int) -> dict[str, float]:
    """Requests per model by method and resource (watches left out): where the requests go."""
    counts: dict[str, int] = {}
    for r in emu._requests[since:]:
        if r.params.get("watch") == "true":
            continue
        what = f"{r.method.value.upper()} {r.resource.plural if r.resource else '?'}" + (
            f"/{r.subresource}" if r.subresource else "")
        counts[what] = counts.get(what, 0) + 1
    return {k: round(v / models, 2) for k, v in sorted(counts.items())}


def machine() -> dict:
    """What the figures were measured on: the CPU and how busy the machine was (it is shared)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return {"cpu": model, "load_average": [round(x, 2) for x in os.getloadavg()]}


async def wait_for(check, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def main(models: int, rollout: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="optimodel-bench-"))
    (tmp / "store").mkdir()
    async with Emulator() as emu, kmock.Server(emu):
        for name, major, minor, product in (A100, H100, L4):
            for i in range(2):
                await emu.put("v1/nodes", gpu_node(f"{name}-{i}", major, minor, product))
        (tmp / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": str(emu.url).rstrip("/")}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
            "users": [{"name": "emu", "user": {"token": "bench"}}]}))
        env = {**os.environ, "KUBECONFIG": str(tmp / "kubeconfig"), "OPTIMODEL_STORE_URI": f"file://{tmp / 'store'}",
               "OPTIMODEL_BUILDER_TOOLCHAIN": json.dumps(TOOLCHAIN), "OPTIMODEL_PEERING": "",
               "OPTIMODEL_LIVENESS": "", "OPTIMODEL_LOG_LEVEL": "WARNING",
               "OPTIMODEL_ALLOW_FILE_URIS": "true"}  # the bench plays kubelet beside the operator
        env.pop("KUBERNETES_SERVICE_HOST", None)
        log = open(tmp / "operator.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "optimodel_operator"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            # ready once every watch stream is open: 7 kinds
            await wait_for(lambda: sum(1 for r in emu._requests if r.params.get("watch") == "true") >= 7,
                           60, "the operator's watches")
            await asyncio.sleep(0.5)
            idle_rss, _ = rss_mib(proc.pid)
            base = operator_requests(emu)
            start, cpu_start = time.monotonic(), cpu_seconds(proc.pid)
            for i in range(models):
                await emu.put(OM, model(f"model-{i:03d}"))
            created = time.monotonic() - start
            want_jobs = 3 * models
            await wait_for(lambda: len(emu.live("batch/v1/jobs", NS)) >= want_jobs, 300, "all Jobs")
            jobs_s = time.monotonic() - start
            requests_at_jobs = operator_requests(emu) - base

            def all_building() -> bool:
                for obj in emu.live(OM, NS):
                    conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
                    if conds.get("Built", {}).get("reason") != "Building":
                        return False
                return True
            await wait_for(all_building, 120, "status Building everywhere")
            await asyncio.sleep(2.0)  # let stragglers land: this is the settled request count
            requests_settled = operator_requests(emu) - base
            rss_after_jobs, _ = rss_mib(proc.pid)
            figures = {
                "models": models, "architectures": 3, "jobs": len(emu.live("batch/v1/jobs", NS)),
                "create_models_s": round(created, 3), "all_jobs_s": round(jobs_s, 3),
                "requests_per_model_until_jobs": round(requests_at_jobs / models, 2),
                "requests_per_model_settled": round(requests_settled / models, 2),
                "operator_rss_idle_mib": round(idle_rss, 1), "operator_rss_mib": round(rss_after_jobs, 1),
                "operator_cpu_s_until_building": round(cpu_seconds(proc.pid) - cpu_start, 2),
            }
            if rollout:
                start, cpu_start = time.monotonic(), cpu_seconds(proc.pid)
                for job in emu.live("batch/v1/jobs", NS):
                    await finish_job(emu, tmp, job)
                await wait_for(lambda: len(emu.live("apps/v1/deployments", NS)) >= want_jobs, 300, "all Deployments")
                figures["all_deployments_s"] = round(time.monotonic() - start, 3)
                figures["operator_cpu_s_until_deployments"] = round(cpu_seconds(proc.pid) - cpu_start, 2)
                for i in range(models):
                    await make_available(emu, f"model-{i:03d}")

                def all_ready() -> bool:
                    return all(any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in o.get("status", {}).get("conditions", [])) for o in emu.live(OM, NS))
                figures["all_ready_s"] = round(time.monotonic() - start + await wait_for(all_ready, 300, "Ready"), 3)
                await asyncio.sleep(1.0)
                figures["requests_per_model_total"] = round((operator_requests(emu) - base) / models, 2)
                figures["requests_per_model_by_kind"] = request_kinds(emu, base, models)
                current, peak = rss_mib(proc.pid)
                figures["operator_rss_mib"] = round(current, 1)
                figures["operator_rss_peak_mib"] = round(peak, 1)
            figures["machine_after"] = machine()
            return figures
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--no-rollout", action="store_true")
    args = parser.parse_args()
    before = machine()
    figures = asyncio.run(main(args.models, not args.no_rollout))
    figures["machine_before"] = before
    print(f"CPU {before['cpu']}; load average {before['load_average']} before, "
          f"{figures['machine_after']['load_average']} after")
    print(f"{figures['models']} models x {figures['architectures']} architectures -> {figures['jobs']} builder Jobs")
    print(f"  all Jobs created after          {figures['all_jobs_s']:.2f} s")
    print(f"  API requests per model (Jobs)   {figures['requests_per_model_until_jobs']:.1f}")
    print(f"  API requests per model (settled) {figures['requests_per_model_settled']:.1f}")
    if "all_deployments_s" in figures:
        print(f"  all Deployments after builds     {figures['all_deployments_s']:.2f} s")
        print(f"  all Ready after builds           {figures['all_ready_s']:.2f} s")
        print(f"  API requests per model (total)   {figures['requests_per_model_total']:.1f}")
        print(f"  operator RSS peak                {figures['operator_rss_peak_mib']:.0f} MiB")
    print(f"  operator RSS idle / now          {figures['operator_rss_idle_mib']:.0f} / {figures['operator_rss_mib']:.0f} MiB")
    print(json.dumps(figures, sort_keys=True))
