"""report.png: p99 against the SLO, the window the tuner chose, and the arrival rate, over the load."""

from __future__ import annotations

import os
from pathlib import Path


def write_plot(path: Path, timeline: dict, phases: list[dict], slo_ms: float, events: list[dict],
               initial_ms: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = timeline["t"]
    fig, (ax_p99, ax_win, ax_rate) = plt.subplots(3, 1, figsize=(9, 7), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 2, 2]})
    fig.suptitle(title, fontsize=11)
    p99 = [v if v is not None else float("nan") for v in timeline["p99Ms"]]
    ax_p99.plot(t, p99, color="tab:blue", lw=1.4, marker=".", ms=4,
                label=f"p99 latency (per {timeline['stepSeconds']:g} s, client side)")
    lost = [x for x, v, n in zip(t, p99, timeline["unanswered"]) if v != v and n]
    if lost:  # more than 1 % of these requests were rejected: their p99 is beyond any number
        ax_p99.plot(lost, [1.0] * len(lost), "v", color="tab:red", ms=6, transform=ax_p99.get_xaxis_transform(),
                    clip_on=False, label="> 1 % rejected (no finite p99)")
    ax_p99.axhline(slo_ms, color="tab:red", ls="--", lw=1.2, label=f"SLO {slo_ms:g} ms")
    # log scale: a p99 can run from a few ms to seconds under overload, and both must stay readable
    ax_p99.set_yscale("log")
    ax_p99.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_p99.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_p99.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_p99.set_ylabel("p99 (ms)")
    seen = [v for v in p99 if v == v] or [slo_ms]
    ax_p99.set_ylim(max(0.5, min(seen + [slo_ms]) / 1.5), max(seen + [slo_ms]) * 1.5)
    ax_p99.legend(loc="upper left", fontsize=8)

    # the window as the tuner set it: a step at each decision that moved it
    end = sum(p["seconds"] for p in phases)
    xs, ys = [0.0], [initial_ms]
    for e in events:
        if e["windowMs"] != ys[-1]:
            xs.append(e["at"])
            ys.append(e["windowMs"])
    xs.append(end)
    ys.append(ys[-1])
    ax_win.step(xs, ys, where="post", color="tab:green", lw=1.6, label="max_wait_ms (window)")
    ax_win.plot(xs[1:-1], ys[1:-1], "o", color="tab:green", ms=4)
    ax_win.set_ylabel("window (ms)")
    ax_win.set_ylim(bottom=0, top=max(1.0, max(ys) * 1.3))
    ax_win.legend(loc="upper left", fontsize=8)

    ax_rate.plot(t, timeline["arrivalRps"], color="tab:purple", lw=1.2, label="arrival rate (req/s)")
    ax_rate.set_ylabel("req/s")
    ax_rate.set_xlabel("seconds since the load started")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend(loc="upper left", fontsize=8)

    begin = 0.0
    for i, phase in enumerate(phases):
        end = begin + phase["seconds"]
        for ax in (ax_p99, ax_win, ax_rate):
            if i % 2:
                ax.axvspan(begin, end, color="0.93", zorder=0)
        ax_rate.text((begin + end) / 2, 0.05, f"{phase['phase']} {phase['rateRps']:g}/s",
                     transform=ax_rate.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="0.3")
        begin = end
    for ax in (ax_p99, ax_win, ax_rate):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
