"""Live batching config: ConfigMap-style symlink swaps, bad files, and a change under load."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import httpx
import numpy as np

from optimodel.batching import BatchingConfig
from serving_image.config_watch import ConfigWatcher

from .conftest import MODEL, sample


class ConfigMapDir:
    """What kubelet does: data in a timestamped dir, `..data` symlink swapped atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.path = root / "batching.json"

    def write(self, text: str) -> None:
        self.version += 1
        stamp = self.root / f"..2026_11_23_{self.version:04d}"
        stamp.mkdir()
        (stamp / "batching.json").write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(stamp.name, tmp)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.rename(tmp, self.root / "..data")
        if old:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()
        if not self.path.is_symlink():
            os.symlink("..data/batching.json", self.path)


def _cfg(wait: float, bs: int) -> str:
    return json.dumps({"maxWaitMs": wait, "maxBatchSize": bs})


def test_configmap_swap_is_seen(tmp_path):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_cfg(2, 32))
    applied = []
    w = ConfigWatcher(cm.path, applied.append, current=BatchingConfig(max_wait_ms=2, max_batch_size=32))
    assert w.poll() is None and applied == []  # same as current: nothing to apply
    cm.write(_cfg(9, 16))
    new = w.poll()
    assert new == BatchingConfig(max_wait_ms=9, max_batch_size=16) and applied == [new]
    assert w.poll() is None, "an unchanged file is not applied twice"
    cm.write(_cfg(9, 16))  # same content, new directory: no change
    assert w.poll() is None and len(applied) == 1


def test_invalid_or_missing_file_keeps_last_good(tmp_path, caplog):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write(_cfg(3, 8))
    applied = []
    w = ConfigWatcher(cm.path, applied.append)
    assert w.poll() == BatchingConfig(max_wait_ms=3, max_batch_size=8)
    with caplog.at_level(logging.WARNING, logger="serving_image"):
        cm.write("{broken")
        assert w.poll() is None
        cm.write(_cfg(-1, 8))
        assert w.poll() is None
        (cm.root / "..data").unlink()
        assert w.poll() is None
    assert w.current == BatchingConfig(max_wait_ms=3, max_batch_size=8) and len(applied) == 1
    text = caplog.text
    assert "invalid" in text and "maxWaitMs" in text and "missing or unreadable" in text
    assert text.count("keeping") == 3
    os.symlink(sorted(p.name for p in cm.root.glob("..2026*"))[-1], cm.root / "..data")
    cm.write(_cfg(4, 8))
    assert w.poll() == BatchingConfig(max_wait_ms=4, max_batch_size=8)


async def test_live_change_under_load_applies_within_a_second_and_drops_nothing(serve, digits_images, reference):
    # no admission deadline: on a starved CI box a queued request may wait past the default,
    # and this test is about the config change dropping nothing
    srv = serve(max_wait_ms=2, max_batch_size=32, deadline_s=None)
    # the server watches a plain file; replace it the way kubelet would with a ConfigMap
    cm = ConfigMapDir(srv.config_path.parent / "cm")
    cm.write(_cfg(2, 32))
    os.replace(srv.config_path, srv.config_path.with_suffix(".old"))
    os.symlink(cm.path, srv.config_path)

    stop = asyncio.Event()
    answers: list[tuple[int, np.ndarray, bytes]] = []

    async def client_loop(client: httpx.AsyncClient, seed: int):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(rng.integers(0, 60))
            n = int(rng.integers(1, 4))
            x = digits_images[i:i + n]
            body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.ravel().tolist()}]})
            r = await client.post(f"/v2/models/{MODEL}/infer", content=body)
            answers.append((r.status_code, x, r.content))

    async def metric(name: str, **labels) -> float:
        return sample((await mclient.get("/metrics")).text, name, **labels)

    async def batch_counts() -> tuple[float, float]:
        text = (await mclient.get("/metrics")).text  # one scrape, so both counts agree
        return sample(text, "optimodel_batch_size_bucket", le="4.0"), sample(text, "optimodel_batch_size_count")

    async with httpx.AsyncClient(base_url=srv.url, limits=httpx.Limits(max_connections=32)) as client, \
            httpx.AsyncClient(base_url=srv.url) as mclient:
        workers = [asyncio.create_task(client_loop(client, s)) for s in range(12)]
        await asyncio.sleep(0.5)
        cm.write(_cfg(7, 4))
        changed_at = time.monotonic()
        while await metric("optimodel_max_batch_size") != 4:
            assert time.monotonic() - changed_at < 1.0, "config not applied within 1 s"
            await asyncio.sleep(0.02)
        applied_after = time.monotonic() - changed_at
        assert await metric("optimodel_max_wait_ms") == 7
        await asyncio.sleep(0.2)  # batches formed before the change have finished
        small_before, total_before = await batch_counts()
        await asyncio.sleep(0.6)
        small_after, total_after = await batch_counts()
        stop.set()
        await asyncio.gather(*workers)

    assert applied_after < 1.0
    assert total_after > total_before, "the server kept serving after the change"
    assert small_after - small_before == total_after - total_before, "every new batch respects maxBatchSize 4"
    assert len(answers) > 50
    for status, x, content in answers:
        assert status == 200, content
        got = np.array(json.loads(content)["outputs"][0]["data"], np.float32).reshape(len(x), 10)
        np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
