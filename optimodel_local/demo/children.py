"""Every process the demo starts, so that a Ctrl-C at any moment stops all of them.

Children run in their own session: a Ctrl-C in the terminal reaches only the demo,
which then stops each child's whole process group in order — SIGINT first (the
builder's temporary folders and the server's drain run on it), SIGKILL after a grace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator


class Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        """A child started elsewhere (with start_new_session=True)."""
        self.procs.append(proc)
        return proc

    def stop_all(self, grace_s: float = 10.0) -> int:
        """Stop every child still running; returns how many were."""
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        # a grandchild that outlived its parent still carries the group id
        for proc in self.procs:
            _signal_group(proc, signal.SIGKILL)
        return len(running)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a closed terminal, `kill`) stops the demo the way Ctrl-C does."""
    def _raise(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
