"""Export MobileNetV2 with real ImageNet weights to ONNX and cut real-photo datasets, offline.

Writes into examples/build/ (or --out):
  mobilenet_v2.onnx      input 'image' float32 [-1, 3, 224, 224] (ImageNet-normalised RGB),
                         output 'logits' float32 [-1, 1000]; dynamic batch axis
  mobilenet_v2.pt        the state_dict (format: pytorch, entrypoint examples.mobilenet_v2:build_model)
  mobilenet_calib.npz    'image': crops for INT8 calibration
  mobilenet_eval.npz     'image': crops for the accuracy gate / bench

The crops come from scikit-image's bundled sample photos (no download). Calibration and
evaluation never see the same pixels: every photo is split in two halves along its longer
side, calibration crops are cut from one half and evaluation crops from the other (which
half alternates between photos), with different random seeds. Crops are random squares of
45-100 % of the half's short side, randomly flipped, resized to 224.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.mobilenet_v2 import build_model  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 224

# Only photos that ship inside scikit-image's wheel; gray ones are replicated to RGB.
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "clock", "coins", "moon",
          "hubble_deep_field", "immunohistochemistry", "retina", "brick", "gravel", "grass"]


def load_photos() -> dict[str, np.ndarray]:
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    out = {}
    for name, img in photos.items():
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out[name] = img[:, :, :3].astype(np.float32) / 255.0
    return out


def halves(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    if w >= h:
        return img[:, : w // 2], img[:, w // 2:]
    return img[: h // 2], img[h // 2:]


def crops(region: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.transform import resize

    h, w = region.shape[:2]
    short = min(h, w)
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        side = int(rng.uniform(0.45, 1.0) * short)
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = region[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = resize(crop, (SIZE, SIZE), anti_aliasing=True, preserve_range=True).astype(np.float32)
        out[i] = ((crop - MEAN) / STD).transpose(2, 0, 1)
    return out


def make_datasets(calib_per_photo: int, eval_per_photo: int) -> tuple[np.ndarray, np.ndarray]:
    calib_rng, eval_rng = np.random.default_rng(1234), np.random.default_rng(98765)
    calib, evals = [], []
    for i, (_, img) in enumerate(sorted(load_photos().items())):
        a, b = halves(img)
        if i % 2:
            a, b = b, a
        calib.append(crops(a, calib_per_photo, calib_rng))
        evals.append(crops(b, eval_per_photo, eval_rng))
    return np.concatenate(calib), np.concatenate(evals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build")
    parser.add_argument("--calib-per-photo", type=int, default=16)
    parser.add_argument("--eval-per-photo", type=int, default=32)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = ["mobilenet_v2.onnx", "mobilenet_v2.pt", "mobilenet_calib.npz", "mobilenet_eval.npz"]
    if all((out / n).exists() for n in names):
        print(f"MobileNetV2 example already built in {out}")
        return 0

    start = time.perf_counter()
    model = build_model(pretrained=True)
    torch.save(model.state_dict(), out / "mobilenet_v2.pt")
    calib, evals = make_datasets(args.calib_per_photo, args.eval_per_photo)
    np.savez(out / "mobilenet_calib.npz", image=calib)
    np.savez(out / "mobilenet_eval.npz", image=evals)

    example = torch.from_numpy(evals[:2])
    torch.onnx.export(
        model, (example,), str(out / "mobilenet_v2.onnx"), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
    )

    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": evals[:8]})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(evals[:8])).numpy()
    err = float(np.abs(got - want).max())
    if err > 1e-3:
        raise SystemExit(f"ONNX export disagrees with torch: max abs error {err:.2e}")
    print(f"built MobileNetV2 example in {time.perf_counter() - start:.1f}s: {len(calib)} calibration and "
          f"{len(evals)} evaluation crops (disjoint halves), max abs error vs torch {err:.1e}, in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
