"""The OptimizedModel API: defaults, camelCase wire format, and field-level errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from optimodel.manifest import ManifestError, load_manifests, parse_manifest
from optimodel.spec import OptimizedModelSpec

ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "apiVersion": "optimodel.io/v1alpha1",
    "kind": "OptimizedModel",
    "metadata": {"name": "m"},
    "spec": {
        "model": {"uri": "file:///models/m.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]},
    },
}


def errors_of(doc: dict) -> dict[str, str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc, "test.yaml")
    return {e.path: e.message for e in info.value.errors}


def with_spec(**changes) -> dict:
    doc = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = doc["spec"]
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


def test_defaults_and_camel_case_round_trip():
    model = parse_manifest(copy.deepcopy(GOOD), "t")
    spec = model.spec
    assert spec.optimization.precision == "fp32"
    assert spec.targets.gpu_architectures == "auto"
    assert spec.serving.max_batch_size == 32
    wire = spec.wire()
    assert wire["serving"]["maxBatchSize"] == 32
    assert "max_batch_size" not in str(wire)
    assert OptimizedModelSpec.model_validate(wire) == spec


def test_unknown_field_is_named():
    doc = with_spec(model__colour="red")
    assert errors_of(doc) == {"spec.model.colour": "unknown field"}


def test_wrong_type_is_named():
    errs = errors_of(with_spec(serving={"replicas": "two"}))
    assert list(errs) == ["spec.serving.replicas"]
    assert "integer" in errs["spec.serving.replicas"]


def test_negative_batch_size_is_rejected():
    errs = errors_of(with_spec(serving={"maxBatchSize": -4}))
    assert "greater than or equal to 1" in errs["spec.serving.maxBatchSize"]


@pytest.mark.parametrize("uri", ["ftp://host/m.onnx", "m.onnx", "file://relative/m.onnx", "pvc:///no-claim", "s3:///no-bucket"])
def test_unsupported_uri_is_rejected(uri):
    errs = errors_of(with_spec(model__uri=uri))
    assert "spec.model.uri" in errs
    assert uri.split(":")[0] in errs["spec.model.uri"] or "needs" in errs["spec.model.uri"] or "must be" in errs["spec.model.uri"]


def test_unsupported_uri_lists_allowed_schemes():
    errs = errors_of(with_spec(model__uri="ftp://host/m.onnx"))
    assert "s3://" in errs["spec.model.uri"] and "pvc://" in errs["spec.model.uri"]


def test_enum_error_lists_allowed_values():
    errs = errors_of(with_spec(optimization={"precision": "int4"}))
    assert errs["spec.optimization.precision"] == "Input should be 'fp32', 'fp16' or 'int8'"


def test_gpu_architectures_auto_or_list():
    assert parse_manifest(with_spec(targets={"gpuArchitectures": ["sm80", "sm90"]}), "t").spec.targets.gpu_architectures == ["sm80", "sm90"]
    errs = errors_of(with_spec(targets={"gpuArchitectures": ["hopper"]}))
    assert "spec.targets.gpuArchitectures[0]" in errs


def test_pytorch_needs_entrypoint():
    errs = errors_of(with_spec(model__format="pytorch"))
    assert "entrypoint" in errs["spec.model"]


def test_model_code_only_for_pytorch_and_with_a_code_suffix():
    code = {"uri": "s3://b/code/digits_cnn.py"}
    ok = with_spec(model__format="pytorch", model__entrypoint="digits_cnn:build_model", model__code=code)
    assert parse_manifest(ok, "t.yaml").spec.model.code.uri == code["uri"]
    assert "code is only allowed with format 'pytorch'" in errors_of(with_spec(model__code=code))["spec.model"]
    errs = errors_of(with_spec(model__format="pytorch", model__entrypoint="m:f",
                               model__code={"uri": "s3://b/code/weights.bin"}))
    assert ".tar.gz" in errs["spec.model.code.uri"]


def test_pruning_on_onnx_is_rejected():
    errs = errors_of(with_spec(optimization={"pruning": {"ratio": 0.5}}))
    assert "pruning" in errs["spec"]


def test_autotune_bounds_and_slo():
    errs = errors_of(with_spec(serving={"batching": {"autotune": {"enabled": True, "minWaitMs": 9, "maxWaitMs": 3}}}))
    assert "minWaitMs" in errs["spec.serving.batching.autotune"]
    errs = errors_of(with_spec(serving={"batching": {"autotune": {"enabled": True}}}))
    assert "p99LatencyMs" in errs["spec.serving.batching.autotune"]


def test_gate_max_drop_default():
    spec = parse_manifest(with_spec(optimization={"accuracyGate": {"datasetUri": "s3://b/gate.npz"}}), "t").spec
    assert spec.optimization.accuracy_gate.max_drop == 0.005


def test_load_manifests_reports_file_and_document(tmp_path):
    path = tmp_path / "two.yaml"
    bad = with_spec(serving={"maxBatchSize": 0})
    path.write_text(yaml.safe_dump(GOOD) + "---\n" + yaml.safe_dump(bad))
    with pytest.raises(ManifestError) as info:
        load_manifests(path)
    assert info.value.source == str(path)
    assert info.value.errors[0].message.startswith("document 2")
    with pytest.raises(ManifestError, match="not valid YAML"):
        (tmp_path / "x.yaml").write_text("a: [")
        load_manifests(tmp_path / "x.yaml")


def test_examples_parse():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert load_manifests(path), path
