"""Train the digits CNN offline and write everything the example manifests use.

Writes into examples/build/ (or --out; `optimodel demo` runs it installed, as
`python -m optimodel_examples.make_digits --out DIR`):
  digits_cnn.onnx          the FP32 model, dynamic batch axis (input 'image', output 'logits')
  digits_cnn.pt            its state_dict, for `format: pytorch` with the digits_cnn entrypoint
  digits_cnn.torchscript   TorchScript of the same model
  digits_cnn.pt2           torch.export of the same model (dynamic batch): needs no model code
  digits_train.npz         training split (image, labels): distillation data
  digits_calib.npz         256 training images: calibration data
  digits_test.npz          held-out split (image, labels): accuracy gate and tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

if __package__:  # imported, or python -m optimodel_examples.make_digits (the installed demo)
    from .digits_cnn import build_model
else:  # python examples/make_digits.py: this folder is on sys.path
    from digits_cnn import build_model


def load_splits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if all((out / f).exists() for f in ("digits_cnn.onnx", "digits_cnn.pt2", "digits_meta.json")):
        print(f"digits example already built in {out}")
        return 0

    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_train, x_test, y_train, y_test = load_splits()
    model = build_model()
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs)
    acc = accuracy(model, x_test, y_test)
    print(f"trained digits CNN in {time.perf_counter() - start:.1f}s, test accuracy {acc:.4f}")

    torch.save(model.state_dict(), out / "digits_cnn.pt")
    example = torch.from_numpy(x_test[:2])
    torch.jit.save(torch.jit.trace(model, example), str(out / "digits_cnn.torchscript"))
    torch.onnx.export(
        model, (example,), str(out / "digits_cnn.onnx"), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
    )
    # torch.export: the graph and weights in one file, no model code needed (the cluster format)
    program = torch.export.export(model.eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(program, str(out / "digits_cnn.pt2"))
    np.savez(out / "digits_train.npz", image=x_train, labels=y_train)
    np.savez(out / "digits_calib.npz", image=x_train[:256])
    np.savez(out / "digits_test.npz", image=x_test, labels=y_test)
    (out / "digits_meta.json").write_text(json.dumps({"testAccuracy": acc, "epochs": args.epochs}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
