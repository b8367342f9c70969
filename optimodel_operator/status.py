"""Conditions per the Kubernetes API conventions (pure).

A condition's lastTransitionTime changes only when its status flips; reason,
message and observedGeneration follow every reconcile. Conditions this
operator does not own (Tuned, written by the tuner) are carried over untouched.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

OWNED = ("Ready", "Built", "AccuracyGatePassed", "Serving")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(type_: str, ok: bool | None, reason: str, message: str = "") -> dict:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(existing: Iterable[dict], new: Iterable[dict], generation: int | None, now: str) -> list[dict]:
    """existing conditions updated with `new` (same order: owned first, then the rest)."""
    old = {c.get("type"): c for c in existing or ()}
    result: list[dict] = []
    seen = set()
    for cond in new:
        prev = old.get(cond["type"])
        flipped = prev is None or prev.get("status") != cond["status"]
        merged = dict(cond)
        merged["lastTransitionTime"] = now if flipped else prev.get("lastTransitionTime") or now
        if generation is not None:
            merged["observedGeneration"] = generation
        result.append(merged)
        seen.add(cond["type"])
    result.extend(c for t, c in old.items() if t not in seen)
    return result


def get(conditions: Iterable[dict], type_: str) -> dict | None:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def ready_summary(built: dict, gate: dict, serving: dict) -> dict:
    """Ready is True only when everything under it is; otherwise it carries the first blocker's reason."""
    parts = (built, gate, serving)
    if all(p["status"] == "True" for p in parts):
        return condition("Ready", True, "Ready", serving.get("message", ""))
    for p in parts:
        if p["status"] == "False":
            return condition("Ready", False, p["reason"], p.get("message", ""))
    blocker = next(p for p in parts if p["status"] != "True")
    return condition("Ready", False, blocker["reason"], blocker.get("message", ""))


def strip_times(conditions: Iterable[dict]) -> list[dict]:
    """Conditions without lastTransitionTime: what decides whether a status write is needed."""
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or ()]
