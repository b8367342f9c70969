"""Render the OptimizedModel CRD from the pydantic models, so the two cannot drift.

Pydantic's JSON schema is turned into a structural openAPIV3Schema: references
inlined, `anyOf [X, null]` collapsed to X, titles dropped, and a union the
structural rules cannot express (targets.gpuArchitectures: "auto" or a list)
kept as x-kubernetes-preserve-unknown-fields; the operator validates that field
with the same pydantic model and reports a bad value in a Ready=False condition.
"""

from __future__ import annotations

from typing import Any

import yaml

from optimodel.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    OptimizedModelSpec,
    OptimizedModelStatus,
)

_DROP = {"title", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    node = {k: v for k, v in node.items() if k not in _DROP}
    if node.get("x-kubernetes-preserve-unknown-fields"):
        keep = {"description", "default", "x-kubernetes-preserve-unknown-fields"}
        return {k: v for k, v in node.items() if k in keep}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            # Optional[X]: the field may be absent; null itself is not accepted
            node = {**_resolve(options[0], defs), **rest}
            if node.get("default", ...) is None:
                del node["default"]
            return _resolve(node, defs)
        raise ValueError(f"union not expressible in a structural schema: {node}")
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    out = {k: _resolve(v, defs) for k, v in node.items()}
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # JSON Schema 2020 writes the bound itself; OpenAPI v3.0 a flag beside minimum/maximum
        if isinstance(out.get(bound), (int, float)) and not isinstance(out.get(bound), bool):
            out[inclusive] = out.pop(bound)
            out[bound] = True
    if out.get("additionalProperties") is False:
        # structural schemas prune unknown fields already; false is not allowed beside properties
        del out["additionalProperties"]
    if "default" in out and isinstance(out["default"], dict) and not out["default"]:
        del out["default"]
    first = [k for k in ("type", "description") if k in out]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def openapi_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(schema, schema.get("$defs", {}))


def crd() -> dict[str, Any]:
    spec_schema = openapi_schema(OptimizedModelSpec)
    spec_schema["description"] = "What to optimize, for which targets, and how to serve it. Written by users; never by the operator."
    status_schema = openapi_schema(OptimizedModelStatus)
    status_schema["description"] = "Observed state, written by the operator."
    columns = [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
        {"name": "Precision", "type": "string", "jsonPath": ".spec.optimization.precision"},
        {"name": "MaxWaitMs", "type": "number", "jsonPath": ".status.serving.maxWaitMs"},
        {"name": "P99Ms", "type": "number", "jsonPath": ".status.serving.p99Ms", "priority": 1},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.serving.endpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "optimodel"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An ML model that Optimodel compresses, compiles per GPU architecture, gates on accuracy, and serves.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `optimodel crd` from optimodel/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
