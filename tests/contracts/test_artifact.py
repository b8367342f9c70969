"""Artifact layout: published all-or-nothing, manifest last, checksums enforced."""

from __future__ import annotations

import json

import pytest

from optimodel import artifact, storage
from optimodel.artifact import ArtifactError, EngineInfo, Manifest
from optimodel.spec import TensorSpec


def make_manifest(key: str = "k1") -> Manifest:
    return Manifest(
        cache_key=key, model_name="m", arch="cpu",
        engine=EngineInfo(file="model.onnx", format="onnx", precision="fp32"),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
        max_batch_size=8, versions={"onnxruntime": "1"}, files=[],
    )


@pytest.fixture
def build_dir(tmp_path):
    d = tmp_path / "build"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"engine-bytes")
    (d / "report.json").write_text(json.dumps({"latency": {}}))
    return d


def test_publish_then_open(tmp_path, build_dir):
    uri = artifact.artifact_uri(f"file://{tmp_path}/store", "ns", "m", "k1")
    assert uri == f"file://{tmp_path}/store/ns/m/k1"
    assert not artifact.is_published(uri)
    artifact.publish(build_dir, make_manifest(), uri)
    assert artifact.is_published(uri)
    local, manifest = artifact.open_artifact(uri)
    assert {f.path for f in manifest.files} == {"model.onnx", "report.json"}
    assert (local / "model.onnx").read_bytes() == b"engine-bytes"
    # no staging directory is left behind
    assert [p.name for p in (tmp_path / "store" / "ns" / "m").iterdir()] == ["k1"]


def test_missing_manifest_is_refused(tmp_path, build_dir):
    with pytest.raises(ArtifactError) as info:
        artifact.verify_local(build_dir)
    assert info.value.reason == "ManifestMissing"


def test_tampered_file_is_refused(tmp_path, build_dir):
    uri = f"file://{tmp_path}/store/k1"
    artifact.publish(build_dir, make_manifest(), uri)
    (tmp_path / "store" / "k1" / "model.onnx").write_bytes(b"engine-bytez")
    with pytest.raises(ArtifactError) as info:
        artifact.open_artifact(uri)
    assert info.value.reason == "ChecksumMismatch"
    assert not artifact.is_published(uri)


def test_missing_listed_file_is_refused(tmp_path, build_dir):
    uri = f"file://{tmp_path}/store/k1"
    artifact.publish(build_dir, make_manifest(), uri)
    (tmp_path / "store" / "k1" / "report.json").unlink()
    with pytest.raises(ArtifactError) as info:
        artifact.open_artifact(uri)
    assert info.value.reason == "FileMissing"


def test_engine_must_be_listed(tmp_path, build_dir):
    (build_dir / "model.onnx").rename(build_dir / "other.onnx")
    artifact.publish(build_dir, make_manifest(), f"file://{tmp_path}/s/k1")
    with pytest.raises(ArtifactError) as info:
        artifact.verify_local(tmp_path / "s" / "k1")
    assert info.value.reason == "ManifestInvalid"


def test_interrupted_directory_is_replaced(tmp_path, build_dir):
    target = tmp_path / "store" / "k1"
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"half")  # a crashed earlier attempt: no manifest
    artifact.publish(build_dir, make_manifest(), f"file://{target}")
    _, manifest = artifact.open_artifact(f"file://{target}")
    assert (target / "model.onnx").read_bytes() == b"engine-bytes"
    assert manifest.cache_key == "k1"


def test_published_artifact_is_not_overwritten(tmp_path, build_dir):
    uri = f"file://{tmp_path}/store/k1"
    artifact.publish(build_dir, make_manifest(), uri)
    before = (tmp_path / "store" / "k1" / "manifest.json").read_text()
    (build_dir / "model.onnx").write_bytes(b"different")
    artifact.publish(build_dir, make_manifest(), uri)
    assert (tmp_path / "store" / "k1" / "manifest.json").read_text() == before
    assert (tmp_path / "store" / "k1" / "model.onnx").read_bytes() == b"engine-bytes"


def test_object_store_path_writes_manifest_last(tmp_path, build_dir, monkeypatch):
    """The non-local branch uploads the files, then the manifest (memory:// stands in for S3)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    order = []
    real_put = fs.put_file

    def put_file(src, dst, **kw):
        order.append(dst.rsplit("/", 1)[-1])
        return real_put(src, dst, **kw)

    monkeypatch.setattr(fs, "put_file", put_file)
    monkeypatch.setattr(storage, "resolve", lambda uri, base_dir=None: (fs, "/" + uri.split("://", 1)[1]))
    monkeypatch.setattr(storage, "is_local", lambda uri: False)
    monkeypatch.setattr(storage, "check_uri", lambda uri: None)
    artifact.publish(build_dir, make_manifest(), "s3://bucket/ns/m/k1")
    assert sorted(order) == ["model.onnx", "report.json"]
    assert fs.exists("/bucket/ns/m/k1/manifest.json")
    local, manifest = artifact.open_artifact("s3://bucket/ns/m/k1", cache_dir=tmp_path / "dl")
    assert (local / "model.onnx").read_bytes() == b"engine-bytes"
