"""Stage logging: one line per stage with its duration, a progress bar in a terminal.

Logs go to stderr: stdout is reserved for the one-line JSON result that
`optimodel run` and the operator read as the last line.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator


class StageLog:
    def __init__(self, planned: list[str] | None = None, stream: IO[str] | None = None, fancy: bool | None = None):
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}
        self.planned = list(planned or [])
        if fancy is None:
            fancy = sys.stdout.isatty() and self.stream.isatty()
        self._progress = None
        self._task = None
        if fancy:
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(file=self.stream), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("build", total=len(self.planned) or None)

    def plan(self, stages: list[str]) -> None:
        """The stages this build will run, once known (sizes the progress bar)."""
        self.planned = list(stages)
        if self._progress is not None:
            self._progress.update(self._task, total=len(stages))

    def info(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.log(message)
        else:
            print(f"[builder] {message}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._progress is not None:
            self._progress.update(self._task, description=name)
        else:
            self.info(f"{name} …")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.timings[name] = round(time.perf_counter() - start, 4)
            self.info(f"{name} failed after {self.timings[name]:.2f}s")
            raise
        self.timings[name] = round(time.perf_counter() - start, 4)
        self.info(f"{name} done in {self.timings[name]:.2f}s")
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
