"""The tuning policy, a pure function: (state, observation, profile, bounds) → next window and why.

1. Too few answered requests for a 1 % tail: hold and say so (InsufficientTraffic).
2. Calibrate the build's engine profile to the engine time the pods measure now, and
   carry the gap between the model's p99 and the measured p99 interval (HTTP, network,
   a busy CPU) as an offset, both smoothed.
3. The engine alone slower than the SLO: no window can help (SloUnreachable, window at
   minWaitMs).
4. Replay the server's batching rule at the measured arrival rate for a ladder of
   windows (model.predict): that separates latency the window adds (waiting) from
   latency the backlog adds (queueing). Goodput = rate × share answered within the SLO.
5. Arrivals at or above what the engine serves with full batches: queueing, not
   waiting. The window moves only where the replay, at the rate the pod can take (the
   server refuses the rest by deadline), predicts a clear gain (where waiting buys batch
   size, and so capacity, cutting it would lower goodput; where batches are full anyway
   it changes nothing), and the reason says to add replicas (Overloaded).
6. Otherwise the window with the highest predicted goodput whose p99 keeps a headroom
   under the SLO; among equals the lowest p99, and among those the shortest window. It
   moves only on a breach or a real gain (hysteresis), so the ConfigMap is written rarely.

Refusals (503s, deadline admission) censor the measurement: the server turns away exactly
the requests that would have been late, so the p99 of what it answered is low while it
refuses, and the engine time it reports swings with a starved CPU. Read naively that
alternates "shorten, p99 is fine" with "lengthen, p99 is over", interval after interval.
So while it refuses, the window never shortens; after a refusal it shortens below the
window in force then only once `quiet_intervals` intervals in a row passed without one
(each relapse doubles that wait), and under overload it moves only for twice the usual gain.
Except where the window itself is the cause: a window that, with one engine run, already
reaches the SLO makes the server refuse what it would answer late, and it must shorten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from optimodel.tuning.model import EngineProfile, Prediction, predict
from optimodel.tuning.observation import Observation

LADDER_MS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0,
             300.0, 500.0, 1000.0, 2000.0, 5000.0)

# Tuned condition reasons (CamelCase) and the condition status each one means
CONVERGED, TUNING, INSUFFICIENT_TRAFFIC = "Converged", "Tuning", "InsufficientTraffic"
SLO_UNREACHABLE, OVERLOADED = "SloUnreachable", "Overloaded"
PROMETHEUS_UNAVAILABLE, PROMETHEUS_NOT_CONFIGURED, METRICS_MISSING = (
    "PrometheusUnavailable", "PrometheusNotConfigured", "MetricsMissing")
NO_PROFILE = "NoLatencyProfile"
FAILING = (SLO_UNREACHABLE, OVERLOADED, PROMETHEUS_UNAVAILABLE, PROMETHEUS_NOT_CONFIGURED, METRICS_MISSING,
           NO_PROFILE)


@dataclass(frozen=True)
class Bounds:
    slo_ms: float
    min_wait_ms: float
    max_wait_ms: float
    max_batch_size: int

    @classmethod
    def from_serving(cls, serving) -> "Bounds":
        """From the spec's `serving` (optimodel.spec.Serving) with autotune set."""
        auto = serving.batching.autotune
        return cls(auto.p99_latency_ms, auto.min_wait_ms, auto.max_wait_ms, serving.max_batch_size)

    def clamp(self, window_ms: float) -> float:
        return min(max(window_ms, self.min_wait_ms), self.max_wait_ms)

    def ladder(self, current: float) -> list[float]:
        """Candidate windows: a window at or over the SLO cannot keep p99 under it (the first request of a
        quiet period waits it all), so the ladder stops below the SLO."""
        out = {self.min_wait_ms, self.clamp(current)}
        out.update(w for w in LADDER_MS if self.min_wait_ms <= w <= self.max_wait_ms and w < self.slo_ms)
        if self.max_wait_ms < self.slo_ms:
            out.add(self.max_wait_ms)
        return sorted(out)


@dataclass(frozen=True)
class PolicySettings:
    min_samples: int = 200       # a p99 needs a tail: 200 requests put 2 in the top 1 %
    headroom: float = 0.10       # aim for p99 ≤ 90 % of the SLO
    min_gain: float = 0.02       # move for ≥ 2 % more goodput …
    min_p99_gain: float = 0.10   # … or a p99 lower by ≥ 10 % of the SLO
    smoothing: float = 0.5       # weight of the newest calibration figures
    model_requests: int = 2000   # Poisson arrivals per replayed window
    reject_share: float = 0.01   # refusals above this share of arrivals mean the server is refusing
    quiet_intervals: int = 3     # intervals without refusals before the window may shorten again


@dataclass(frozen=True)
class TunerState:
    """What the tuner carries between decisions; the window is also in the ConfigMap (the restart point)."""

    window_ms: float
    engine_scale: float = 1.0
    offset_ms: float = 0.0
    decisions: int = 0
    changes: int = 0
    refused_window_ms: float | None = None  # the window in force at the last refusal (shortening floor)
    quiet: int | None = None                  # intervals without refusals since the last (None: never)
    relapses: int = 0                         # refusals again soon after the floor was lifted


@dataclass(frozen=True)
class Decision:
    window_ms: float
    previous_ms: float
    reason: str
    message: str
    state: TunerState
    predicted_p99_ms: float | None = None

    @property
    def changed(self) -> bool:
        return not math.isclose(self.window_ms, self.previous_ms, abs_tol=1e-9)

    @property
    def condition_status(self) -> str:
        if self.reason in FAILING:
            return "False"
        if self.reason == INSUFFICIENT_TRAFFIC:
            return "Unknown"
        return "True"


def hold(state: TunerState, bounds: Bounds, reason: str, message: str) -> Decision:
    """No decision possible (no data, no Prometheus): the window stays where it is."""
    window = bounds.clamp(state.window_ms)
    return Decision(window, state.window_ms, reason, message, replace(state, window_ms=window))


def decide(state: TunerState, obs: Observation, profile: EngineProfile | None, bounds: Bounds,
           settings: PolicySettings = PolicySettings()) -> Decision:
    current = bounds.clamp(obs.window_ms if obs.window_ms is not None else state.window_ms)
    state = replace(state, window_ms=current, decisions=state.decisions + 1)
    slo = bounds.slo_ms

    # 1. enough answered requests for a tail
    if obs.samples < settings.min_samples or obs.p99_ms is None:
        return hold(state, bounds, INSUFFICIENT_TRAFFIC,
                    f"{obs.samples} requests in {obs.seconds:.0f}s, fewer than the {settings.min_samples} a p99 "
                    f"needs; holding {current:g} ms")
    if profile is None:
        return hold(state, bounds, NO_PROFILE, "the engine's report.json has no latency profile; holding "
                                               f"{current:g} ms")

    # 2. calibrate the build's profile to what the engine measures now
    scale = state.engine_scale
    if obs.engine_ms and obs.mean_batch:
        measured = min(max(obs.engine_ms / profile.ms(obs.mean_batch), 0.2), 5.0)
        scale = (1 - settings.smoothing) * scale + settings.smoothing * measured
    # 2 % steps of scale and rate: the replay is cached, and the same figures come back interval after interval
    engine = profile.scaled(_quantize(scale))
    rate = _quantize(max(obs.arrival_rps, obs.answered_rps))
    rejecting = obs.reject_rps > settings.reject_share * max(rate, 1e-9)
    # a request that waits out this window and then runs alone is already past the SLO: the window itself is
    # what the server refuses for, not overload, and a shorter window is the cure, not something to guard against
    window_refuses = current + engine.ms(1) >= slo
    state = _remember_refusals(state, current, rejecting and not window_refuses, settings)
    floor = state.refused_window_ms  # no shorter window than this while it is set

    # 3. the engine alone cannot meet the SLO
    alone = engine.ms(1)
    if alone >= slo:
        window = bounds.min_wait_ms
        return Decision(window, current, SLO_UNREACHABLE,
                        f"the engine alone takes {alone:.1f} ms per request (batch 1) against a p99 SLO of {slo:g} ms "
                        f"(measured p99 {obs.p99_ms} ms); window at minWaitMs {window:g} ms",
                        replace(state, window_ms=window, engine_scale=scale,
                                changes=state.changes + (window != current)))

    # 4. replay the batcher: where does each window put p99 and goodput at this rate
    def model(window: float, slo_shift: float = 0.0) -> Prediction:
        return predict(engine, rate, window, bounds.max_batch_size, slo - slo_shift,
                       requests=settings.model_requests)

    at_current = model(current)
    lo, hi = obs.p99_ms.lo, obs.p99_ms.hi
    if at_current.p99_ms < lo:
        residual = lo - at_current.p99_ms
    elif at_current.p99_ms > hi:
        residual = hi - at_current.p99_ms
    else:
        residual = 0.0  # the model falls inside the bucket the measured p99 is in
    offset = (1 - settings.smoothing) * state.offset_ms + settings.smoothing * residual
    offset = min(max(offset, -slo / 2), slo)
    state = replace(state, engine_scale=scale, offset_ms=offset)
    preds = {w: model(w, offset) for w in bounds.ladder(current)}
    p99 = {w: p.p99_ms + offset for w, p in preds.items()}
    goodput = {w: rate * p.under_slo for w, p in preds.items()}

    # what the measurement says about now: a p99 bucket straddling the SLO is settled by the share under it
    if hi <= slo:
        breach = False
    elif lo > slo:
        breach = True
    else:
        breach = obs.under_slo is not None and obs.under_slo < 0.99
    figures = (f"p99 {obs.p99_ms} ms vs SLO {slo:g} ms at {rate:.0f} req/s, batch {obs.mean_batch or 0:.1f}, "
               f"engine {obs.engine_ms or 0:.2f} ms/batch")

    # 5. overload: queueing, not waiting
    capacity = engine.capacity_rps(bounds.max_batch_size)
    if rate >= 0.98 * capacity or (rejecting and breach and not window_refuses):
        # the replay says whether a window buys capacity here, replayed at what the pod can take (the server
        # refuses the rest by deadline; an unbounded replay queue past capacity is noise); move only for twice
        # the usual gain, and never to a shorter window while it refuses
        served = min(rate, 0.95 * capacity)
        served_goodput = {w: served * predict(engine, served, w, bounds.max_batch_size, slo - offset,
                                              requests=settings.model_requests).under_slo for w in preds}
        allowed = [w for w in preds if floor is None or w >= min(floor, current)]
        cand = max(allowed, key=lambda w: (served_goodput[w], -w))
        best = cand if served_goodput[cand] >= served_goodput[current] * (1 + 2 * settings.min_gain) else current
        queue = f", queue wait p99 {obs.queue_p99_ms} ms" if obs.queue_p99_ms else ""
        if rate >= 0.98 * capacity:
            why = (f"arrivals reach the {capacity:.0f} req/s one pod serves with full batches of "
                   f"{bounds.max_batch_size}; the latency is queueing, which a shorter window does not lower")
        else:
            # below the profile's capacity yet refusing: the engine runs slower here than when it was profiled
            why = (f"the server refused {obs.reject_rps:.0f} req/s although the profile puts one pod at "
                   f"{capacity:.0f} req/s: the engine is slower here than its profile (a busy CPU?)")
        return _done(state, current, best, OVERLOADED, f"{figures}{queue}: {why}; add replicas", p99[best])

    # 6. the best window under the SLO with headroom; move only for a real gain or on a breach
    target = slo * (1 - settings.headroom)
    # after a refusal the measured p99 is censored: no shorter window until the quiet intervals have passed
    allowed = [w for w in preds if floor is None or w >= min(floor, current)]
    when = "in this interval" if not state.quiet else f"{state.quiet} interval(s) ago"
    held = "" if floor is None or floor <= min(preds) else \
        f" (not below {floor:g} ms: the server refused requests {when})"
    feasible = [w for w in allowed if p99[w] <= target]
    if not feasible:
        best = min(allowed, key=lambda w: (round(p99[w], 1), -w))
        if breach and best != current and p99[best] < p99[current] - 0.5:
            return _done(state, current, best, TUNING,
                         f"{figures}: no window keeps p99 under {target:.0f} ms at this rate; "
                         f"moving to the lowest predicted p99 ({p99[best]:.1f} ms)", p99[best])
        reason = SLO_UNREACHABLE if breach else CONVERGED
        return _done(state, current, current, reason,
                     f"{figures}: no window is predicted to keep p99 under {target:.0f} ms at this rate; "
                     f"holding{held}", p99[current])
    top = max(goodput[w] for w in feasible)
    near = [w for w in feasible if goodput[w] >= top * (1 - settings.min_gain / 2)]
    low = min(p99[w] for w in near)
    # among equals the smaller window: a short timer costs a real event loop more than the replay shows
    best = min(w for w in near if p99[w] <= low + 0.25)
    gain = (goodput[best] - goodput[current]) / max(goodput[current], 1e-9)
    p99_gain = p99[current] - p99[best]
    move = (breach or p99[current] > target or gain >= settings.min_gain
            or p99_gain >= settings.min_p99_gain * slo)
    if not move or abs(best - current) < 0.5:
        return _done(state, current, current, CONVERGED, f"{figures}: holding{held}", p99[current])
    why = "p99 over the SLO" if breach else (f"{gain:+.0%} goodput predicted" if gain >= settings.min_gain
                                            else f"p99 {p99[current]:.1f} → {p99[best]:.1f} ms predicted")
    return _done(state, current, best, TUNING, f"{figures}: {why}", p99[best])


def _remember_refusals(state: TunerState, current: float, rejecting: bool, settings: PolicySettings) -> TunerState:
    """Keep the shortening floor: set at a refusal, lifted after enough quiet intervals (doubling per relapse)."""
    def needed(relapses: int) -> int:
        return settings.quiet_intervals * 2 ** min(relapses, 3)

    if rejecting:
        relapses = state.relapses
        if state.quiet is not None and state.refused_window_ms is None:
            # refusing again soon after the floor was lifted: wait longer next time; after a long calm, start over
            relapses = relapses + 1 if state.quiet < 2 * needed(relapses) else 0
        floor = max(current, state.refused_window_ms or current)
        return replace(state, refused_window_ms=floor, quiet=0, relapses=relapses)
    if state.quiet is None:
        return state
    quiet = state.quiet + 1
    floor = state.refused_window_ms if quiet < needed(state.relapses) else None
    return replace(state, refused_window_ms=floor, quiet=quiet)


def _quantize(x: float, step: float = 1.02) -> float:
    return step ** round(math.log(x) / math.log(step)) if x > 0 else x


def _done(state: TunerState, current: float, window: float, reason: str, message: str,
          predicted: float | None) -> Decision:
    changed = not math.isclose(window, current, abs_tol=1e-9)
    new = replace(state, window_ms=window, changes=state.changes + changed)
    return Decision(window, current, reason, message, new, predicted)


def describe(decision: Decision, obs: Observation | None, bounds: Bounds, when: str) -> str:
    """One readable line per decision (what `optimodel run` prints)."""
    if obs is None or obs.p99_ms is None:
        head = f"{when}  p99 n/a vs SLO {bounds.slo_ms:g} ms"
    else:
        head = (f"{when}  p99 {obs.p99_ms} ms vs SLO {bounds.slo_ms:g} ms  {obs.arrival_rps:.0f} req/s  "
                f"batch {obs.mean_batch or 0:.1f}")
    arrow = "→" if decision.changed else "="
    return f"{head}  window {decision.previous_ms:g} {arrow} {decision.window_ms:g} ms  {decision.reason}: {decision.message}"
