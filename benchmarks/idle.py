"""Waiting for a quiet moment on a machine shared with other work (Linux: /proc/stat)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from types import TracebackType


def cpu_jiffies() -> tuple[int, int]:
    """(all, idle + iowait) CPU time since boot, summed over the CPUs, in clock ticks (Linux: /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values), values[3] + values[4]


def busy(seconds: float = 2.0) -> float:
    """Share of the CPUs busy over `seconds` while this process sleeps (so: other processes' share)."""
    total0, idle0 = cpu_jiffies()
    time.sleep(seconds)
    total1, idle1 = cpu_jiffies()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


class OthersShare:
    """`with OthersShare() as o: ...` then `o.share`: the share of the CPUs that other processes used during the block.

    All CPU time spent in the block, less this process's and that of the children it waited for in the block
    (resource.getrusage), over the block's CPU time. None without /proc/stat.
    """

    share: float | None = None

    @staticmethod
    def _own() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    def __enter__(self) -> OthersShare:
        self._start = (cpu_jiffies(), self._own()) if Path("/proc/stat").exists() else None
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._start is None:
            return
        (total0, idle0), own0 = self._start
        total1, idle1 = cpu_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        busy_s = ((total1 - total0) - (idle1 - idle0)) / tick
        self.share = max(busy_s - (self._own() - own0), 0.0) / max((total1 - total0) / tick, 1e-9)


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
