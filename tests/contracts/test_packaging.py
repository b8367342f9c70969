"""The wheel holds every package: `packages` in pyproject.toml is an explicit list (examples/ ships
as optimodel_examples), and a subpackage missing from it works in a checkout but not installed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_in_the_tree_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {v: k for k, v in config.get("package-dir", {}).items()}
    found = set()
    for top in ("optimodel", "optimodel_local", "optimodel_operator", "builder_job", "serving_image", "examples"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join((mapped.get(parts[0], parts[0]), *parts[1:])))
    assert found == listed
    assert "digits-cnn-int8.yaml" in {p.name for p in (ROOT / "examples").glob(config["package-data"]["optimodel_examples"][0])}
