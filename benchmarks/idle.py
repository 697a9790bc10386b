"""Waiting for a quiet moment on a machine shared with other work (Linux: /proc/stat)."""

from __future__ import annotations

import time
from pathlib import Path


def busy(seconds: float = 2.0) -> float:
    """Share of the CPUs busy over `seconds` while this process sleeps (so: other processes' share)."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_idle(limit: float | None, patience: float = 120.0) -> float | None:
    """Wait (up to `patience` seconds) until other processes use under `limit` of the CPUs; their last share.

    None (and no wait) when `limit` is None or the system has no /proc/stat.
    """
    if limit is None or not Path("/proc/stat").exists():
        return None
    deadline = time.monotonic() + patience
    while True:
        share = busy()
        if share < limit or time.monotonic() > deadline:
            return share


def note(limit: float | None, what: str = "each started") -> str:
    """The words a results table adds about the wait."""
    return "" if limit is None else f", {what} once other processes used under {limit:.0%} of the CPUs"
