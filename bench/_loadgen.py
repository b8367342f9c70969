"""Open-loop HTTP/1.1 load generator for loopback benchmarks.

Requests are scheduled at their intended send times (Poisson arrivals at a given
rate) no matter how the server is doing, and each latency is measured from that
intended time, so a stalled server cannot hide its slow requests behind a client
that politely waited (coordinated omission). The client is deliberately thin: one
pre-encoded request, raw asyncio streams on keep-alive connections, a minimal
response parser, so that most of the measured time is the server's.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np


def http_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
             "Content-Type: application/octet-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


@dataclass
class Result:
    rate: float
    scheduled: int
    ok: int = 0
    rejected: int = 0  # 503
    errors: int = 0  # other statuses, connection errors, unanswered at the deadline
    unanswered: int = 0  # of errors: still waiting when the grace period ended
    error_kinds: dict = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    send_s: float = 0.0  # how long sending took: past duration_s, the client could not keep the rate

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def pct(self, q: float) -> float:
        """Percentile over every scheduled request; unanswered or failed ones count as infinitely slow."""
        if not self.scheduled:
            return float("nan")
        lat = sorted(self.latencies_ms)
        k = int(np.ceil(q / 100 * self.scheduled)) - 1
        return lat[k] if k < len(lat) else float("inf")

    def summary(self) -> dict:
        def ms(v: float) -> float | None:  # JSON has no Infinity: an unanswered tail is null
            return round(v, 2) if np.isfinite(v) else None

        return {"rate": round(self.rate, 1), "scheduled": self.scheduled, "ok": self.ok, "rejected": self.rejected,
                "errors": self.errors, "unanswered": self.unanswered,
                "error_kinds": {str(k): v for k, v in self.error_kinds.items()}, "throughput": round(self.throughput, 1),
                "p50_ms": ms(self.pct(50)), "p99_ms": ms(self.pct(99))}


class Client:
    """Keep-alive connections, most recently used first.

    The server closes a connection idle for 5 s (its keep-alive timeout); reusing one
    the server already closed fails with a reset that is the client's fault, not
    the server's, so connections idle longer than MAX_IDLE_S are dropped unused.
    """

    MAX_IDLE_S = 3.0

    def __init__(self, host: str, port: int, max_connections: int | None = None):
        """max_connections: past it a request waits for a free connection (file descriptors are finite:
        an unbounded open-loop client at 10x overload ran out of 20,000)."""
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None

    async def connect(self, n: int) -> None:
        for _ in range(n):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.idle.append((reader, writer, time.monotonic()))

    async def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, last = self.idle.pop()
            if now - last < self.MAX_IDLE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        return (await self.send_timed(request))[:2]

    async def send_timed(self, request: bytes) -> tuple[int, bytes, float]:
        """(status, body, when the request was written)."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            reader, writer = await self._take()
            try:
                sent = time.perf_counter()
                writer.write(request)
                status, body = await read_response(reader)
            except BaseException:
                writer.close()
                raise
            self.idle.append((reader, writer, time.monotonic()))
            return status, body, sent
        finally:
            if self._slots is not None:
                self._slots.release()

    async def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle = []


async def open_loop(client: Client, requests: list[bytes], rate: float, duration_s: float,
                    max_requests: int, grace_s: float = 5.0, seed: int = 0, from_send: bool = False) -> Result:
    """Send at Poisson arrival times for duration_s (at most max_requests); wait grace_s for stragglers.

    from_send: latency from when a request was really written, not from its intended time; for
    offered loads past what this client can send, where its own lag is not the server's.
    """
    rng = random.Random(seed)
    n = max(1, min(max_requests, round(rate * duration_s)))
    # Poisson arrivals rescaled to span exactly duration_s: bursty like real traffic, yet the
    # offered rate is the nominal one, so runs at different rates compare
    gaps = [rng.expovariate(1.0) for _ in range(n)]
    scale = duration_s / sum(gaps)
    times, t = [], 0.0
    for g in gaps:
        t += g * scale
        times.append(t)
    result = Result(rate=rate, scheduled=len(times))
    done_at: list[float] = []

    async def one(intended: float, req: bytes) -> None:
        try:
            if from_send:
                status, _, intended = await client.send_timed(req)
            else:
                status, _ = await client.send(req)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.errors += 1
            kind = type(exc).__name__
            result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
            return
        now = time.perf_counter()
        if status == 200:
            result.ok += 1
            result.latencies_ms.append((now - intended) * 1000)
            done_at.append(now)
        elif status == 503:
            result.rejected += 1
        else:
            result.errors += 1
            result.error_kinds[status] = result.error_kinds.get(status, 0) + 1

    start = time.perf_counter() + 0.05
    tasks = []
    for i, offset in enumerate(times):
        intended = start + offset
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(intended, requests[i % len(requests)])))
    result.send_s = time.perf_counter() - start
    _, pending = await asyncio.wait(tasks, timeout=grace_s) if tasks else (set(), set())
    for p in pending:
        p.cancel()
    result.errors += len(pending)
    result.unanswered = len(pending)
    end = max(done_at) if done_at else time.perf_counter()
    result.duration_s = max(end - start, times[-1] if times else 0.0)
    return result


async def closed_loop_latencies(client: Client, request: bytes, n: int) -> list[float]:
    """One request at a time: per-request round trip in ms (for overhead, not throughput)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await client.send(request)
        out.append((time.perf_counter() - t0) * 1000)
        assert status == 200, status
    return out


async def concurrent_closed_loop(client: Client, requests: list[bytes], concurrency: int,
                                 duration_s: float) -> dict:
    """`concurrency` users, each sending its next request when the last is answered (the peers' setup)."""
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def user(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                status, _ = await client.send(requests[i % len(requests)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                continue
            if status == 200:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    arr = np.array(lat) if lat else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "throughput": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2)}
