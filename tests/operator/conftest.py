"""Fixtures for the operator tests: the emulated API server, a kubeconfig pointing at it,
a file:// artifact store, and the operator itself running in the test's event loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kube_emulator import Emulator
from operator_helpers import TOOLCHAIN, running_operator


@pytest.fixture
def kmock_options() -> dict:
    return {"cls": Emulator}


@pytest.fixture
def store(tmp_path: Path) -> str:
    (tmp_path / "store").mkdir()
    return f"file://{tmp_path / 'store'}"


@pytest.fixture
def operator_env(tmp_path: Path, kmock: Emulator, store: str, monkeypatch) -> dict:
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
        "users": [{"name": "emu", "user": {"token": "test"}}],
    }))
    env = {
        "KUBECONFIG": str(config),
        "OPTIMODEL_STORE_URI": store,
        "OPTIMODEL_BUILDER_IMAGE": "registry.test/builder:1",
        "OPTIMODEL_SERVING_IMAGE": "registry.test/serving:1",
        "OPTIMODEL_BUILDER_TOOLCHAIN": json.dumps(TOOLCHAIN),
        "OPTIMODEL_RESYNC_SECONDS": "0.5",
        "OPTIMODEL_PEERING": "",
        "OPTIMODEL_WORKERS": "4",
        # the tests play kubelet on this machine: the builder and the servers see the operator's files
        "OPTIMODEL_ALLOW_FILE_URIS": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return env


@pytest.fixture
async def operator(operator_env):
    async with running_operator() as memo:
        yield memo


