"""The CRD is generated from the spec models; the committed file must match, and be valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from optimodel.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "optimizedmodel.yaml"


def test_committed_crd_matches_generated():
    assert CRD_FILE.read_text() == crd_yaml(), "crds/optimizedmodel.yaml drifted: run `optimodel crd -o crds/optimizedmodel.yaml`"


def test_cli_prints_the_same_crd():
    out = subprocess.run([sys.executable, "-m", "optimodel", "crd"], capture_output=True, text=True, check=True).stdout
    assert out == CRD_FILE.read_text()


def test_crd_passes_kubernetes_validate():
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.37.0", strict=True)


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert any(c["name"] == "Ready" for c in version["additionalPrinterColumns"])
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node or "items" in node:
            assert node.get("type") in ("object", "array"), path
        if "description" in node and ".properties." in path and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node or "properties" in node, path


def test_examples_validate_against_crd_schema():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # OpenAPI v3.0 bounds (exclusiveMinimum: true) are draft-4 semantics
    validator = jsonschema.Draft4Validator(schema)
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            errors = list(validator.iter_errors(doc))
            assert not errors, f"{path.name}: {[e.message for e in errors]}"


def test_crd_schema_rejects_bad_values():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema)
    doc = yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text())
    doc["spec"]["serving"]["maxBatchSize"] = -1
    doc["spec"]["optimization"] = {"precision": "int4"}
    messages = " ".join(e.message for e in validator.iter_errors(doc))
    assert "int4" in messages and "-1" in messages


@pytest.mark.parametrize("field", ["spec", "status"])
def test_crd_has_spec_and_status(field):
    props = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert props[field]["type"] == "object"
