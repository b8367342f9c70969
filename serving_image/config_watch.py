"""Watch the batching config file and hand every new valid config to a callback.

A ConfigMap mount is `batching.json -> ..data/batching.json`, and kubelet updates it
by pointing `..data` at a new timestamped directory. An inotify watch or an open file
handle stays on the old directory, so the file is re-read by path. Each poll stats
the path (following the symlinks) and re-reads it when the resolved target, inode,
size or mtime changed; comparing the bytes then makes a touch without a change a
no-op. A bad file keeps the last good config and is logged once per distinct content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Callable

from optimodel.batching import BatchingConfig

log = logging.getLogger("serving_image")


class ConfigWatcher:
    def __init__(self, path: Path, on_change: Callable[[BatchingConfig], object],
                 current: BatchingConfig | None = None, interval: float = 0.2):
        self.path = Path(path)
        self.on_change = on_change
        self.current = current
        self.interval = interval
        self._signature: tuple | None = None
        self._content: bytes | None = None
        self._last_problem: str | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows ..data symlinks to the live file
            return (os.path.realpath(self.path), st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            log.warning("batching config %s: %s; keeping %s", self.path, message,
                        json.dumps(self.current.wire()) if self.current else "the current config")
            self._last_problem = message

    def poll(self) -> BatchingConfig | None:
        """Check the file once; returns the new config when one was applied."""
        sig = self._stat()
        if sig is None:
            if self._signature is not None or self._last_problem is None:
                self._problem("file is missing or unreadable")
            self._signature = None
            return None
        if sig == self._signature:
            return None
        self._signature = sig
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._signature = None
            self._problem(f"unreadable: {exc}")
            return None
        if data == self._content:
            return None
        self._content = data
        try:
            config = BatchingConfig.model_validate(json.loads(data))
        except ValueError as exc:
            self._problem(f"invalid: {' '.join(str(exc).split())}")
            return None
        self._last_problem = None
        if config == self.current:
            return None
        self.current = config
        applied = self.on_change(config)
        log.info("batching config applied: %s", json.dumps((applied or config).wire()))
        return config

    async def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # a watcher that dies would freeze tuning silently
                log.exception("batching config watch failed; retrying")
            await asyncio.sleep(self.interval)
