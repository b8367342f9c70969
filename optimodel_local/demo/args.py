"""`optimodel demo`'s options (light: the CLI builds its parser from this without the demo's imports)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="optimodel-demo", type=Path,
                   help="the demo's folder: data, artifact store, logs, report (default ./optimodel-demo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--once", action="store_true", help="exit after the report instead of serving")
    p.add_argument("--phase-seconds", type=float, default=20.0, metavar="S",
                   help="length of each load phase (low, high, low); default 20")
    p.add_argument("--rates", default="100,400", metavar="LOW,HIGH", help="requests per second (default 100,400)")
    p.add_argument("--tune-interval", type=float, default=3.0, metavar="S",
                   help="seconds between tuner decisions (default 3)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="reuse a folder made by make_digits.py instead of training (tests)")
