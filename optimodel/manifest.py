"""Read OptimizedModel manifests from YAML and report errors by field path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from optimodel.spec import OptimizedModel

# pydantic adds union-branch and validator tags to error locations; a user wants the field path
_TAG = re.compile(r"^(literal|list|function-\w+|union|tagged-union|json-or-python|constrained-\w+)\[.*\]$|^(str|int|float|bool)$")


@dataclass
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    def __init__(self, source: str, errors: list[FieldError]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(str(e) for e in errors))


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    """One error per (field path, message), paths as a manifest writes them; prefix roots them
    (the operator validates the spec alone and reports `spec.…`)."""
    out: list[FieldError] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        parts: list[str] = []
        for part in err["loc"]:
            if isinstance(part, int):
                parts.append(f"[{part}]")
            elif not _TAG.match(str(part)):
                parts.append(str(part))
        path = ".".join([prefix, *parts] if prefix else parts).replace(".[", "[")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")
        if (path, msg) not in seen:
            seen.add((path, msg))
            out.append(FieldError(path, msg))
    return out


def parse_manifest(doc: object, source: str) -> OptimizedModel:
    if not isinstance(doc, dict):
        raise ManifestError(source, [FieldError("", "a manifest must be a YAML mapping")])
    try:
        return OptimizedModel.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(source, field_errors(exc)) from None


def load_manifests(path: Path) -> list[OptimizedModel]:
    """Every OptimizedModel in a YAML file (documents of other kinds are an error)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestError(str(path), [FieldError("", f"cannot read: {exc.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(str(path), [FieldError("", f"not valid YAML: {exc}")]) from None
    if not docs:
        raise ManifestError(str(path), [FieldError("", "no document in file")])
    models, errors = [], []
    for i, doc in enumerate(docs):
        try:
            models.append(parse_manifest(doc, str(path)))
        except ManifestError as exc:
            where = f"document {i + 1}: " if len(docs) > 1 else ""
            errors += [FieldError(e.path, where + e.message) for e in exc.errors]
    if errors:
        raise ManifestError(str(path), errors)
    return models
