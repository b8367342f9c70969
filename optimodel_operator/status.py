"""Conditions per the Kubernetes API conventions (pure), on the contract's Condition type.

A condition's lastTransitionTime changes only when its status flips; reason,
message and observedGeneration follow every reconcile. Conditions this
operator does not own (Tuned, written by the tuner) are carried over untouched.
The reconcile works on Condition; the tuner's pass still speaks camelCase dicts, and
merge_conditions/get serve it through the same rules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Mapping

from optimodel.spec import Condition

OWNED = ("Ready", "Built", "AccuracyGatePassed", "Serving")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make(type_: str, ok: bool | None, reason: str, message: str = "") -> Condition:
    """A condition as this pass sees it; merge() gives it its lastTransitionTime."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time="")


def merge(existing: Iterable[Condition], new: Iterable[Condition], generation: int | None,
          now: str) -> list[Condition]:
    """existing conditions updated with `new` (same order: new first, then the rest)."""
    old = {c.type: c for c in existing or ()}
    result: list[Condition] = []
    for cond in new:
        prev = old.pop(cond.type, None)
        flipped = prev is None or prev.status != cond.status
        changes = {"last_transition_time": now if flipped else prev.last_transition_time or now}
        if generation is not None:
            changes["observed_generation"] = generation
        result.append(cond.model_copy(update=changes))
    return result + list(old.values())


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions or () if c.type == type_), None)


def ready_summary(built: Condition, gate: Condition, serving: Condition) -> Condition:
    """Ready is True only when everything under it is; otherwise it carries the first blocker's reason."""
    parts = (built, gate, serving)
    if all(p.status == "True" for p in parts):
        return make("Ready", True, "Ready", serving.message)
    blocker = next((p for p in parts if p.status == "False"), None) or next(p for p in parts if p.status != "True")
    return make("Ready", False, blocker.reason, blocker.message)


def parse(raw: Mapping) -> Condition:
    return Condition.model_validate({"lastTransitionTime": "", **raw})


def wire(c: Condition) -> dict:
    """camelCase, with only the fields that were set: a condition read from the API (the tuner's)
    goes back exactly as it came, so an unchanged status compares equal and is not rewritten."""
    return c.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)


# ---- the same rules on camelCase dicts (the tuner's pass) ------------------------------------

def condition(type_: str, ok: bool | None, reason: str, message: str = "") -> dict:
    return {k: v for k, v in wire(make(type_, ok, reason, message)).items() if k != "lastTransitionTime"}


def merge_conditions(existing: Iterable[Mapping], new: Iterable[Mapping], generation: int | None,
                     now: str) -> list[dict]:
    return [wire(c) for c in merge([parse(c) for c in existing or ()], [parse(c) for c in new], generation, now)]


def get(conditions: Iterable[Mapping], type_: str) -> Mapping | None:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def strip_times(conditions: Iterable[Mapping]) -> list[dict]:
    """Conditions without lastTransitionTime: what decides whether a status write is needed."""
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or ()]
