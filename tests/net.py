"""Network helpers the test folders share."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now: tests run in parallel with other jobs, so never a fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
