"""The demo's proof: the served model answers like the ONNX model run directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimodel.spec import OptimizedModel


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


def compare_with_onnxruntime(model: OptimizedModel, base_url: str, build_dir: Path, console) -> bool:
    import onnxruntime as ort

    data = np.load(build_dir / "digits_test.npz")
    images, labels = data["image"][:16], data["labels"][:16]
    served = infer_with_tritonclient(base_url, model.metadata.name, "image", images, "logits")
    session = ort.InferenceSession(str(build_dir / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    direct = session.run(["logits"], {"image": images})[0]
    max_diff = float(np.abs(served - direct).max())
    same_top1 = bool((served.argmax(1) == direct.argmax(1)).all())
    console.print(f"16 digits through tritonclient: predicted {served.argmax(1).tolist()}")
    console.print(f"                          labels     {labels.tolist()}")
    console.print(f"max |served - onnxruntime| = {max_diff:.2e}, same top-1: {same_top1}")
    ok = same_top1 and max_diff < 1e-3
    console.print("[green]demo check passed[/]" if ok else "[red]demo check FAILED[/]")
    return ok
