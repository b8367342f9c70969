"""The three CPU images, built by `make images` (no Docker engine), running the product under podman.

builder: a container builds examples/digits-cnn.yaml's request (rendered by the operator, as its
ConfigMap would carry it) into a store folder mounted from the host, exits 0 with the result line,
and the artifact it publishes verifies. serving: a container (uid 10001, --read-only) serves that
artifact on a published port, answers tritonclient like ONNX Runtime run directly, shows /metrics,
and on `podman stop` drains and exits 0. operator: starts, reads its settings, and exits non-zero
with a clear message when a setting is bad or there is no cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from optimodel.artifact import artifact_uri, open_artifact
from optimodel.batching import BatchingConfig, write_batching_config
from optimodel.build import BuildResult
from optimodel.cache_key import cache_key, canonical_options, model_digest, toolchain_versions
from optimodel_local.check import infer_with_tritonclient
from optimodel_local.run import wait_ready
from optimodel.spec import OptimizedModel
from optimodel.target import CPU
from optimodel_operator import render
from optimodel_operator.settings import Settings
from tests.net import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_images.sh"
VERSION = "0.1.0"
IMAGE = {name: f"localhost/optimodel/{name}:{VERSION}" for name in ("operator", "builder", "serving")}
CLAIM, PVC_ROOT = "optimodel-store", "/mnt/pvc"
UID = 10001
STOP_GRACE_S = 20


def podman_env() -> dict[str, str]:
    out = subprocess.run([str(SCRIPT), "--env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    return env


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """`make images` (the same target CI and users run); skipped only where podman cannot be installed."""
    t0 = time.monotonic()
    proc = subprocess.run(["make", "-s", "images"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 and not (shutil.which("podman") and shutil.which("buildah")):
        pytest.skip(f"podman/buildah are not installed and could not be installed: {proc.stderr[-500:]}")
    assert proc.returncode == 0, f"make images failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(f"\nmake images ({time.monotonic() - t0:.0f} s):\n{proc.stdout}")
    return IMAGE


@pytest.fixture(scope="module")
def store(images, digits_build, tmp_path_factory) -> Path:
    """A host folder mounted as the pvc:// store, the digits model in it, owned by the image's user."""
    root = tmp_path_factory.mktemp("store")
    (root / "models").mkdir()
    shutil.copy(digits_build / "digits_cnn.onnx", root / "models" / "digits_cnn.onnx")
    for path in [root, *root.rglob("*")]:
        os.chown(path, UID, UID)
    return root


def digits_request(store: Path) -> tuple[dict, str]:
    """The builder's request as the operator renders it into its ConfigMap, for a pvc:// store."""
    model = OptimizedModel.model_validate(yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text()))
    spec = model.spec.model_copy(update={"model": model.spec.model.model_copy(
        update={"uri": f"pvc://{CLAIM}/models/digits_cnn.onnx"})})
    digest = model_digest(spec.model, store / "models" / "digits_cnn.onnx")
    key = cache_key(digest, canonical_options(spec.model, spec.optimization, spec.serving.max_batch_size),
                    CPU, toolchain_versions(CPU))
    ref = render.ModelRef(namespace="default", name="digits-cnn", uid="")
    uri = artifact_uri(f"pvc://{CLAIM}/artifacts", ref.namespace, ref.name, key)
    request = render.build_request(ref, spec, CPU, key, uri)
    configmap = render.request_configmap(ref, "digits-cnn-cpu", request, CPU)
    job = render.builder_job(ref, spec, CPU, key, "digits-cnn-cpu", Settings(pvc_root=PVC_ROOT))
    return {"configmap": configmap, "job": job}, uri


@pytest.fixture(scope="module")
def built(images, store, tmp_path_factory) -> str:
    rendered, uri = digits_request(store)
    request_dir = tmp_path_factory.mktemp("request")
    request_dir.chmod(0o755)  # as a ConfigMap volume: readable by the pod's user
    (request_dir / "request.json").write_text(rendered["configmap"]["data"]["request.json"])
    container = rendered["job"]["spec"]["template"]["spec"]["containers"][0]
    env = [f"--env={e['name']}={e['value']}" for e in container["env"]]
    proc = podman("run", "--rm", "--read-only", "--network=none", *env,
                  f"--env=OPTIMODEL_PROFILE_SECONDS=0.05",
                  f"--volume={store}:{PVC_ROOT}/{CLAIM}", f"--volume={request_dir}:{render.REQUEST_DIR}:ro",
                  images["builder"], *container["command"], check=False)
    assert proc.returncode == 0, f"builder container exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    result = BuildResult.model_validate_json(proc.stdout.strip().splitlines()[-1])
    assert (result.state, result.artifact_uri) == ("Succeeded", uri)
    return uri


def test_builder_container_publishes_a_verified_artifact(built, store):
    local = store / built.removeprefix(f"pvc://{CLAIM}/")
    directory, manifest = open_artifact(f"file://{local}")
    assert manifest.model_name == "digits-cnn"
    # written by the container's user into the host folder, nothing by root
    assert {p.stat().st_uid for p in directory.rglob("*")} == {UID}


def test_builder_container_stops_on_sigterm_as_pid_1(images, built, store, tmp_path):
    """A build in a long latency profile ends at `podman stop` with 143 (its handler), not SIGKILL's 137."""
    rendered, _ = digits_request(store)
    request = json.loads(rendered["configmap"]["data"]["request.json"])
    # another key: the digits key is already published (a cache hit would exit at once)
    request["cacheKey"] = "f" * 64
    request["artifactUri"] = artifact_uri(f"pvc://{CLAIM}/artifacts", "default", "stopped", request["cacheKey"])
    (tmp_path / "request.json").write_text(json.dumps(request))
    tmp_path.chmod(0o755)
    name = f"optimodel-builder-test-{os.getpid()}"
    podman("run", "--detach", "--name", name, "--read-only", "--network=none", f"--env=OPTIMODEL_PVC_ROOT={PVC_ROOT}",
           "--env=OPTIMODEL_PROFILE_SECONDS=60", f"--volume={store}:{PVC_ROOT}/{CLAIM}",
           f"--volume={tmp_path}:{render.REQUEST_DIR}:ro",
           images["builder"], "python", "-m", "builder_job", "--request", f"{render.REQUEST_DIR}/request.json")
    try:
        deadline = time.monotonic() + 180
        while "profile …" not in podman("logs", name).stderr and time.monotonic() < deadline:
            time.sleep(0.5)
        t0 = time.monotonic()
        podman("stop", f"--time={STOP_GRACE_S}", name)
        stopped_in = time.monotonic() - t0
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name).stderr
        assert "profile …" in logs, logs[-3000:]
        assert state["ExitCode"] == 143 and stopped_in < STOP_GRACE_S, logs[-3000:]
        assert not (store / "artifacts" / "default" / "stopped" / request["cacheKey"] / "manifest.json").exists()
    finally:
        podman("rm", "--force", name, check=False)


def test_serving_container_serves_like_onnxruntime_and_drains_on_stop(images, built, store, digits_build, tmp_path):
    batching = tmp_path / "batching"
    write_batching_config(batching / render.BATCHING_FILE, BatchingConfig(max_wait_ms=2, max_batch_size=32))
    batching.chmod(0o755)
    port, name = free_port(), f"optimodel-serving-test-{os.getpid()}"
    podman("run", "--detach", "--name", name, "--read-only", f"--publish=127.0.0.1:{port}:{render.PORT}",
           f"--env=OPTIMODEL_PVC_ROOT={PVC_ROOT}", f"--volume={store}:{PVC_ROOT}/{CLAIM}:ro",
           f"--volume={batching}:{render.BATCHING_DIR}:ro", f"--stop-timeout={STOP_GRACE_S}",
           images["serving"], "python", "-m", "serving_image", "--artifact", built,
           "--config", f"{render.BATCHING_DIR}/{render.BATCHING_FILE}", "--host", "0.0.0.0",
           "--port", str(render.PORT), "--model-name", "digits-cnn", "--drain-seconds", "1")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(None, base, timeout_s=120)
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        assert podman("exec", name, "touch", "/opt/venv/x", check=False).returncode != 0  # read-only root

        data = np.load(digits_build / "digits_test.npz")
        images_batch = data["image"][:5]
        session = ort.InferenceSession(str(digits_build / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
        expected = session.run(["logits"], {"image": images_batch})[0]
        for binary in (False, True):
            served = infer_with_tritonclient(base, "digits-cnn", "image", images_batch, "logits", binary)
            np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert "optimodel_request_latency_seconds_count" in metrics

        t0 = time.monotonic()
        podman("stop", f"--time={STOP_GRACE_S}", name)
        stopped_in = time.monotonic() - t0
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        # exit 0 (not 137): the server drained on SIGTERM as PID 1 rather than being killed at the grace
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after {stopped_in:.1f} s:\n{logs[-3000:]}"
        assert stopped_in < STOP_GRACE_S
        assert "draining" in logs
    finally:
        podman("rm", "--force", name, check=False)


def test_operator_container_reads_settings_and_fails_clearly_without_a_cluster(images):
    common = ("run", "--rm", "--read-only", "--network=none")
    bad = podman(*common, "--env=OPTIMODEL_WORKERS=many", images["operator"], check=False, timeout=120)
    assert bad.returncode == 2
    assert "OPTIMODEL_WORKERS='many'" in bad.stderr and "integer" in bad.stderr

    # valid settings, no in-cluster service account, no kubeconfig
    none = podman(*common, "--env=OPTIMODEL_PEERING=", "--env=OPTIMODEL_LIVENESS=", images["operator"],
                  check=False, timeout=180)
    assert none.returncode == 3, none.stdout[-2000:] + none.stderr[-2000:]
    assert "optimodel-operator: no Kubernetes credentials: not in a cluster" in none.stderr


def test_images_carry_labels_and_no_build_leftovers(images):
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    host_ca_digest = hashlib.sha256(host_ca.read_bytes()).hexdigest() if host_ca.exists() else None
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name, image in images.items():
        config = json.loads(podman("image", "inspect", image).stdout)[0]
        labels = config["Labels"]
        assert labels["org.opencontainers.image.version"] == VERSION
        assert labels["org.opencontainers.image.revision"].startswith(revision)
        assert labels["org.opencontainers.image.source"].startswith("https://")
        assert config["Config"]["User"] == f"{UID}:{UID}"
        mount = Path(podman("image", "mount", image).stdout.strip())
        try:
            leftovers = [p for p in ("src", "dist", "wheels", "run/host-ca.crt", "root/.cache", "tmp/tools",
                                     "opt/venv/bin/pip", "usr/bin/gcc", "usr/bin/cc") if (mount / p).exists()]
            assert leftovers == [], f"{name}: {leftovers}"
            own_ca = mount / "etc" / "ssl" / "certs" / "ca-certificates.crt"
            # a host whose bundle is Debian's own cannot be told apart by content: /run/host-ca.crt above covers it
            if host_ca_digest and not (own_ca.exists() and hashlib.sha256(own_ca.read_bytes()).hexdigest() == host_ca_digest):
                size = host_ca.stat().st_size
                copies = [p for p in mount.rglob("*") if p.is_file() and not p.is_symlink()
                          and p.stat().st_size == size and hashlib.sha256(p.read_bytes()).hexdigest() == host_ca_digest]
                assert copies == [], f"{name} carries the host's CA bundle: {copies}"
            has_torch = any((mount / "opt" / "venv").glob("lib/python3*/site-packages/torch"))
            assert has_torch == (name == "builder"), f"{name}: torch installed: {has_torch}"
        finally:
            podman("image", "unmount", image, check=False)
