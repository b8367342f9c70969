"""Overload: past maxQueue the server answers 503 + Retry-After at once and keeps serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from optimodel.batching import BatchingConfig

from .conftest import MODEL, SlowBackend, app_server, sample


async def test_burst_past_the_queue_gets_503_and_no_crash(digits_artifact, digits_images, reference):
    config = BatchingConfig(max_wait_ms=0, max_batch_size=4, max_queue=8)
    with app_server(digits_artifact, config, wrap_backend=SlowBackend) as srv:
        x = digits_images[:1]
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]})
        async with httpx.AsyncClient(base_url=srv.url, limits=httpx.Limits(max_connections=150),
                                     timeout=30) as client:
            answers = await asyncio.gather(*(client.post(f"/v2/models/{MODEL}/infer", content=body)
                                             for _ in range(150)))
            ok = [r for r in answers if r.status_code == 200]
            busy = [r for r in answers if r.status_code == 503]
            assert len(ok) + len(busy) == len(answers), {r.status_code for r in answers}
            assert len(ok) >= 8 and len(busy) > 0, (len(ok), len(busy))  # the queue was served, the rest refused
            assert all(r.headers["retry-after"] == "1" and "queue full" in r.json()["error"] for r in busy)
            for r in ok:
                np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], np.float32),
                                           reference(x).ravel(), rtol=1e-5, atol=1e-5)
            text = (await client.get("/metrics")).text
            assert sample(text, "optimodel_rejected_total", reason="queue_full") == len(busy)
            assert sample(text, "optimodel_inflight_requests") == 0
            # still healthy and serving
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.post(f"/v2/models/{MODEL}/infer", content=body)).status_code == 200
