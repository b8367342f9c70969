"""A small CNN for sklearn's 8x8 digits, wide enough that convolution dominates.

`build_model` is the entrypoint a `format: pytorch` manifest names
(`entrypoint: digits_cnn:build_model` beside the manifest); make_digits.py trains it.
"""

from __future__ import annotations

from torch import nn


def build_model(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 64),
        *block(64, 128),
        *block(128, 128),
        nn.MaxPool2d(2),
        *block(128, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )
