"""TensorRT backend. The engine tests need an NVIDIA GPU with TensorRT and cuda-python:
they are marked `gpu` and skipped on machines without one (the machine this was
written on has neither a GPU nor TensorRT, so they have not run here yet). The
profile check is pure Python and runs everywhere.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from serving_image.tensorrt_backend import ShapeOutsideProfile, check_profile


def test_profile_check_names_the_axis():
    check_profile("image", (4, 1, 8, 8), (1, 1, 8, 8), (32, 1, 8, 8))
    with pytest.raises(ShapeOutsideProfile, match="dimension 0 is 33, the engine's optimization profile allows 1..32"):
        check_profile("image", (33, 1, 8, 8), (1, 1, 8, 8), (32, 1, 8, 8))
    with pytest.raises(ShapeOutsideProfile, match="rank 3"):
        check_profile("image", (4, 8, 8), (1, 1, 8, 8), (32, 1, 8, 8))


def test_importing_serving_image_does_not_import_tensorrt():
    import subprocess
    import sys

    code = "import sys, serving_image.app, serving_image.backends, serving_image.tensorrt_backend; " \
           "print('tensorrt' in sys.modules, any(m.startswith('cuda') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture(scope="module")
def trt_artifact(digits_build, tmp_path_factory):
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from optimodel.artifact import EngineInfo, Manifest, publish
    from optimodel.spec import TensorSpec

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((digits_build / "digits_cnn.onnx").read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    src = tmp_path_factory.mktemp("trt-src")
    (src / "model.plan").write_bytes(bytes(plan))
    shutil.copy(digits_build / "digits_cnn.onnx", src / "model.onnx")
    manifest = Manifest(cache_key="t" * 64, model_name="digits", arch="sm90",
                        engine=EngineInfo(file="model.plan", format="tensorrt", precision="fp32"),
                        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])],
                        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
                        max_batch_size=32, versions={"tensorrt": trt.__version__}, files=[])
    dest = tmp_path_factory.mktemp("trt-store") / "digits"
    publish(src, manifest, dest.as_uri())
    return dest


@pytest.mark.gpu
def test_tensorrt_matches_onnxruntime(trt_artifact, digits_images, reference):
    from optimodel.artifact import open_artifact
    from optimodel.batching import batch_size_ladder
    from serving_image.backends import load_backend, warm_up

    local, manifest = open_artifact(trt_artifact.as_uri())
    backend = load_backend(local, manifest)
    assert backend.platform == "tensorrt_plan" and backend.max_batch_size == 32
    warm_up(backend, batch_size_ladder(backend.max_batch_size))
    for n in (1, 7, 32):
        x = digits_images[:n]
        got = backend.run({"image": x})["logits"]
        np.testing.assert_allclose(got, reference(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ShapeOutsideProfile, match="dimension 0 is 33"):
        backend.run({"image": np.zeros((33, 1, 8, 8), np.float32)})
    backend.close()
