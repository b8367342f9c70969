"""`optimodel run` with autotune on: the tuning loop for one local server.

Every interval: observe (the server's /metrics, or Prometheus with --prometheus),
decide, write the window into the batching file the server watches, print one line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Protocol

from optimodel.batching import load_batching_config, write_batching_config
from optimodel.tuning import policy
from optimodel.tuning.model import EngineProfile
from optimodel.tuning.observation import Observation, ObservationError
from optimodel.tuning.prometheus import PrometheusSource, Selector
from optimodel.tuning.scrape import MetricsScraper


class Source(Protocol):
    def observe(self) -> Observation | None: ...


@dataclass
class PrometheusWindow:
    """PrometheusSource bound to one selector and window (the Source the loop calls)."""

    source: PrometheusSource
    selector: Selector
    window_s: int
    slo_ms: float

    def observe(self) -> Observation:
        return self.source.observe(self.selector, self.window_s, self.slo_ms)


class LocalTuner:
    def __init__(self, source: Source, config_file: Path, profile: EngineProfile | None, bounds: policy.Bounds,
                 settings: policy.PolicySettings = policy.PolicySettings(), echo: Callable[[str], None] = print):
        self.source, self.config_file, self.profile, self.bounds = source, Path(config_file), profile, bounds
        self.settings, self.echo = settings, echo
        self.state = policy.TunerState(window_ms=load_batching_config(self.config_file).max_wait_ms)
        self.decisions: list[policy.Decision] = []

    def step(self) -> policy.Decision | None:
        try:
            obs = self.source.observe()
        except ObservationError as exc:
            decision = policy.hold(self.state, self.bounds, exc.reason, f"{exc}; holding {self.state.window_ms:g} ms")
            obs = None
        else:
            if obs is None:  # the first scrape only sets the baseline
                return None
            decision = policy.decide(self.state, obs, self.profile, self.bounds, self.settings)
        if decision.changed:
            config = load_batching_config(self.config_file)
            write_batching_config(self.config_file, config.model_copy(update={"max_wait_ms": decision.window_ms}))
        self.state = decision.state
        self.decisions.append(decision)
        self.echo(policy.describe(decision, obs, self.bounds, datetime.now().strftime("%H:%M:%S")))
        return decision

    def run(self, interval_s: float, stop: threading.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            self.step()
            next_at += interval_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self, interval_s: float) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(interval_s, stop), name="optimodel-tuner", daemon=True)
        thread.start()
        return thread, stop


def make_source(base_url: str, model: str, namespace: str, arch: str, slo_ms: float, interval_s: float,
                prometheus_url: str | None) -> Source:
    if prometheus_url:
        # rates need a few scrapes inside the window
        return PrometheusWindow(PrometheusSource(prometheus_url), Selector(namespace, model, arch),
                                max(int(round(interval_s)), 4), slo_ms)
    return MetricsScraper(base_url, model=model, arch=arch, slo_ms=slo_ms)
