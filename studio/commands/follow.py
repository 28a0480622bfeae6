"""Following a background run from the terminal (the commands' --wait) and the ETA text they print."""

from __future__ import annotations

import sys
import time

from ..context import Studio

POLL_S = 2.0  # how often --wait re-reads the run


def eta_text(seconds: float | None) -> str:
    """Time left as 4m05s (or 1h02m past an hour); "-" while unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def follow_run(studio: Studio, run_id: int, poll_s: float = POLL_S) -> int:
    """Print a line whenever the run's status, step or loss changes, until it ends.

    Returns 0 if it succeeded; otherwise says why on stderr and returns 1.
    """
    from .. import runs

    last = None
    while True:
        view = runs.run_status(studio, run_id, log_lines=0)
        line = f"run {run_id}: {view.status} {view.step}/{view.total} eta {eta_text(view.eta_s)}"
        if isinstance(view.metrics.get("loss"), int | float):
            line += f" loss {view.metrics['loss']:.4f}"
        if line != last:
            print(line, flush=True)
            last = line
        if view.finished:
            if view.status != "succeeded":
                print(f"run {run_id} {view.status}: {view.error or ''}", file=sys.stderr)
                return 1
            return 0
        time.sleep(poll_s)
