"""Ask a local server through tritonclient, the Open Inference Protocol client of Triton (a dev extra)."""

from __future__ import annotations

import numpy as np


def infer_with_tritonclient(base_url: str, model_name: str, input_name: str, batch: np.ndarray,
                            output_name: str, binary: bool = True) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=base_url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput(input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary)
        out = httpclient.InferRequestedOutput(output_name, binary_data=binary)
        return client.infer(model_name, [inp], outputs=[out]).as_numpy(output_name)
    finally:
        client.close()
