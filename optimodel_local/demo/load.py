"""An open-loop load in phases of different rates (the demo's low → high → low step).

Requests leave at Poisson-scheduled times whatever the server does, and each
latency counts from that scheduled time, so a stalled server cannot hide its slow
requests behind a client that waited (coordinated omission). Raw keep-alive
streams: an HTTP library would cost more CPU per request than the server does.

The demo runs it as its own process (`python -m optimodel_local.demo.load`): in the
demo's process the tuner's replay holds the GIL for tens of milliseconds per
decision, which would delay sends and show up in a p99 that is the client's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float      # requests per second
    seconds: float


@dataclass
class Sample:
    at: float                 # scheduled send time, seconds since the load started
    phase: int
    status: int = 0           # HTTP status; -1 connection error; 0 unanswered
    latency_ms: float | None = None


@dataclass
class StepLoad:
    url: str
    bodies: list[bytes]
    phases: list[Phase]
    connections: int = 64
    seed: int = 0
    samples: list[Sample] = field(default_factory=list)
    started_at: float = 0.0   # time.monotonic() when the first phase began
    on_phase: object = None   # callable(index, Phase), called from the load thread

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="demo-load", daemon=True)

    def start(self) -> "StepLoad":
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def _request(self, body: bytes) -> bytes:
        parts = urlsplit(self.url)
        return (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def _connect(self):
        parts = urlsplit(self.url)
        return await asyncio.open_connection(parts.hostname, parts.port)

    async def _one(self, pool: asyncio.Queue, request: bytes, sample: Sample, t0: float) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await pool.get()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line[15:]) for line in head.split(b"\r\n")
                           if line[:15].lower() == b"content-length:"), 0)
            await reader.readexactly(length)
            sample.status = int(head[9:12])
            sample.latency_ms = (loop.time() - t0 - sample.at) * 1000.0
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            sample.status = -1
            writer.close()
            try:
                pool.put_nowait(await self._connect())
            except OSError:
                pass

    async def _main(self) -> None:
        pool: asyncio.Queue = asyncio.Queue()
        for _ in range(self.connections):
            pool.put_nowait(await self._connect())
        requests = [self._request(b) for b in self.bodies]
        rng = random.Random(self.seed)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        t0 = loop.time()
        self.started_at = time.monotonic()
        begin = 0.0
        for index, phase in enumerate(self.phases):
            if self.on_phase:
                self.on_phase(index, phase)
            end, at = begin + phase.seconds, begin
            while not self._stop.is_set():
                at += rng.expovariate(phase.rate)
                if at >= end:
                    break
                delay = t0 + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sample = Sample(at=at, phase=index)
                self.samples.append(sample)
                task = asyncio.create_task(self._one(pool, requests[len(self.samples) % len(requests)], sample, t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            begin = end
            if self._stop.is_set():
                break
        if tasks:  # the last answers; what is still open after this counts as unanswered
            await asyncio.wait(tasks, timeout=5)
        while not pool.empty():
            pool.get_nowait()[1].close()


SAMPLE_DTYPE = np.dtype([("at", "f8"), ("phase", "i2"), ("status", "i2"), ("latency_ms", "f8")])


def save_samples(path: Path, samples: list[Sample]) -> None:
    table = np.array([(s.at, s.phase, s.status, np.nan if s.latency_ms is None else s.latency_ms)
                      for s in samples], dtype=SAMPLE_DTYPE)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.save(f, table)
    os.replace(tmp, path)


def load_samples(path: Path) -> list[Sample]:
    table = np.load(path)
    return [Sample(float(r["at"]), int(r["phase"]), int(r["status"]),
                   None if np.isnan(r["latency_ms"]) else float(r["latency_ms"])) for r in table]


def parse_phases(text: str) -> list[Phase]:
    """name:rate:seconds,name:rate:seconds,..."""
    phases = []
    for part in text.split(","):
        name, rate, seconds = part.split(":")
        phases.append(Phase(name, float(rate), float(seconds)))
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimodel_local.demo.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the infer endpoint")
    parser.add_argument("--bodies", required=True, type=Path, help="request bodies, one JSON document per line")
    parser.add_argument("--phases", required=True, type=parse_phases, help="name:rate:seconds,...")
    parser.add_argument("--out", required=True, type=Path, help="every request's schedule, status, latency (.npy)")
    args = parser.parse_args(argv)
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]

    def announce(index: int, phase: Phase) -> None:
        print(f"phase {index} {phase.name} {phase.rate:g} {phase.seconds:g}", flush=True)

    load = StepLoad(args.url, bodies, args.phases, on_phase=announce).start()
    try:
        while not load.join(0.5):
            pass
    except KeyboardInterrupt:  # the demo stops its children with SIGINT: nothing is written then
        load.stop()
        return 130
    save_samples(args.out, load.samples)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
