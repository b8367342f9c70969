"""The one exception every build stage raises: a reason code and a message for status."""

from __future__ import annotations

from optimodel.build import BuildReason


class BuildError(Exception):
    def __init__(self, reason: BuildReason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"
