"""TorchServe handler for the bench MLP: the same ONNX file on ONNX Runtime, one thread, as our server runs it.

A request body is the raw FP32 input (256 x 4 bytes per sample); the answer is the 10 logits as JSON.
TorchServe batches requests itself (batchSize / maxBatchDelay in its model config).
"""

from __future__ import annotations

import os

import numpy as np

_session = None


def _initialize(context) -> None:
    global _session
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("OPTIMODEL_BENCH_THREADS", "1"))
    so.inter_op_num_threads = 1
    model_dir = context.system_properties.get("model_dir")
    _session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), sess_options=so,
                                    providers=["CPUExecutionProvider"])


def handle(data, context):
    if _session is None:
        _initialize(context)
    if data is None:
        return None
    rows = []
    for item in data:
        body = item.get("body") or item.get("data")
        rows.append(np.frombuffer(bytes(body), dtype=np.float32).reshape(-1, 256))
    x = np.concatenate(rows)
    y = _session.run(["y"], {"x": x})[0]
    out, offset = [], 0
    for r in rows:
        out.append(y[offset:offset + len(r)].tolist())
        offset += len(r)
    return out
