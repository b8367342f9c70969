"""A small open-loop (Poisson) load for the tuning tests: sends at scheduled times, never waits for answers."""

from __future__ import annotations

import asyncio
import json
import random
import threading

from urllib.parse import urlsplit
import numpy as np


def infer_body(input_name: str, image: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": input_name, "shape": list(image.shape), "datatype": "FP32",
                                   "data": image.ravel().tolist()}]}).encode()


class OpenLoop:
    """Poisson arrivals at `rate` per second in a background thread until stop()."""

    def __init__(self, url: str, body: bytes, rate: float, seed: int = 0):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.body, self.rate = body, rate
        self.rng = random.Random(seed)
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> "OpenLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _one(self, pool: asyncio.Queue, request: bytes) -> None:
        # raw keep-alive streams: httpx's client costs more CPU per request than the server does
        try:
            reader, writer = await pool.get()
        except asyncio.CancelledError:
            return
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            code = int(head[9:12])
            length = next((int(line[15:]) for line in head.split(b"\r\n")
                           if line[:15].lower() == b"content-length:"), 0)
            await reader.readexactly(length)
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            code = -1
            writer.close()
            pool.put_nowait(await asyncio.open_connection(self.host, self.port))
        self.statuses[code] = self.statuses.get(code, 0) + 1

    async def _main(self) -> None:
        pool: asyncio.Queue = asyncio.Queue()
        for _ in range(32):
            pool.put_nowait(await asyncio.open_connection(self.host, self.port))
        request = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n").encode() + self.body
        loop = asyncio.get_running_loop()
        next_at, tasks = loop.time(), set()
        while not self._stop.is_set():
            next_at += self.rng.expovariate(self.rate)
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(self._one(pool, request))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        while not pool.empty():
            pool.get_nowait()[1].close()
