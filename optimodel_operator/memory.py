"""What this operator process wrote and the watches may not show yet.

Its last status per model (the index may still hold the one before), the tuner's Tuned
condition, quota refusals of its last writes, the children it created or applied until
the watch shows an event of them, and artifacts found published (a published artifact
never changes under its key). Worker threads share it: one lock guards every access.
"""

from __future__ import annotations

import threading
from typing import Mapping

from optimodel.artifact import is_published

from optimodel_operator import render
from optimodel_operator import status as cond
from optimodel_operator.scheduler import Key

# status fields only this operator writes; the rest (Tuned, serving metrics) belongs to the tuner
OWNED_STATUS = ("observedGeneration", "engines")


class Memory:
    """What this process wrote that the watches may not show yet. Shared by worker threads:
    every access holds the lock."""

    def __init__(self, pvc_root: str | None = None) -> None:
        self.pvc_root = pvc_root  # where this process finds pvc:// stores (Settings.pvc_root)
        self._lock = threading.Lock()
        self._status: dict[str, tuple[int | None, dict]] = {}  # uid -> (generation, status we wrote)
        self._tuned: dict[str, dict] = {}  # uid -> the Tuned condition the tuner wrote last
        self._refused: dict[Key, dict[str, str]] = {}  # model -> child name -> a quota's refusal
        self._written: dict[Key, dict[tuple[str, str], dict]] = {}  # model -> (kind, name) -> written, not watched
        self._published: set[str] = set()  # a published artifact never changes under its key

    def wrote_status(self, uid: str, generation: int | None, status: dict) -> None:
        with self._lock:
            self._status[uid] = (generation, status)

    def tuned(self, uid: str, condition: dict) -> None:
        with self._lock:
            self._tuned[uid] = condition

    def status_of(self, body: Mapping) -> dict:
        """The model's status as this process last wrote it (the watch may lag behind)."""
        status = dict(body.get("status") or {})
        uid = body["metadata"].get("uid", "")
        with self._lock:
            mine, tuned = self._status.get(uid), self._tuned.get(uid)
        if mine is not None and mine[0] == body["metadata"].get("generation"):
            _, written = mine
            for k in OWNED_STATUS:
                if k in written:
                    status[k] = written[k]
            others = [c for c in status.get("conditions") or [] if c.get("type") not in cond.OWNED]
            status["conditions"] = [c for c in written.get("conditions", []) if c.get("type") in cond.OWNED] + others
        if tuned is not None:
            status["conditions"] = [tuned if c.get("type") == "Tuned" else c for c in status.get("conditions") or []]
            if not any(c.get("type") == "Tuned" for c in status["conditions"]):
                status["conditions"].append(tuned)
        return status

    def refusals(self, key: Key) -> dict[str, str]:
        with self._lock:
            return dict(self._refused.get(key, {}))

    def set_refusals(self, key: Key, refused: Mapping[str, str]) -> None:
        with self._lock:
            self._refused[key] = dict(refused)

    def wrote(self, obj: dict) -> None:
        """A child this process created or applied (the API's answer, or what it sent)."""
        meta = obj["metadata"]
        with self._lock:
            mine = self._written.setdefault((meta["namespace"], meta["labels"][render.L_MODEL]), {})
            mine[(obj["kind"], meta["name"])] = obj

    def watched(self, kind: str, namespace: str, model: str, name: str) -> None:
        """The watch delivered an event of this object: the index is as new as our write now."""
        with self._lock:
            mine = self._written.get((namespace, model))
            if mine is not None:
                mine.pop((kind, name), None)
                if not mine:
                    del self._written[(namespace, model)]

    def written(self, kind: str, key: Key) -> dict[str, dict]:
        """Objects of this kind and model written and not yet watched, by name."""
        with self._lock:
            return {name: obj for (k, name), obj in self._written.get(key, {}).items() if k == kind}

    def batching_json(self, key: Key, seen: str | None) -> str | None:
        """The batching.json to plan from: the last one applied until the watch shows it."""
        mine = self.written("ConfigMap", key).get(render.batching_name(key[1]))
        return seen if mine is None else mine["data"][render.BATCHING_FILE]

    def forget(self, key: Key, uid: str) -> None:
        """The model is gone: what was kept for it would otherwise stay for the life of the process."""
        with self._lock:
            self._status.pop(uid, None)
            self._tuned.pop(uid, None)
            self._refused.pop(key, None)
            self._written.pop(key, None)

    def holds(self, key: Key, uid: str) -> bool:
        """Whether anything is kept for this model."""
        with self._lock:
            return any((uid in self._status, uid in self._tuned, key in self._refused, key in self._written))

    def is_published(self, uri: str) -> bool:
        with self._lock:
            if uri in self._published:
                return True
        if is_published(uri, pvc_root=self.pvc_root):
            with self._lock:
                self._published.add(uri)
            return True
        return False
