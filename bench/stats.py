"""Small statistics helpers: every measurement is kept raw and summarised as median [min, max]."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "values"}`` of ``values`` (None fields when empty)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": [round(v, 6) for v in vals],
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """median(a) / median(b), or None when either is missing."""
    if not a or not b or (a.get("median") in (None, 0) and b.get("median") in (None, 0)):
        return None
    if a.get("median") is None or not b.get("median"):
        return None
    return float(a["median"]) / float(b["median"])


def _busy_jiffies() -> int:
    """CPU time (all cores) spent busy since boot, from /proc/stat: user..steal, idle and iowait excluded."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _cpu_jiffies(pid: int) -> tuple[int, int, int, int]:
    """utime, stime, cutime, cstime of one process, from /proc/<pid>/stat (OSError if gone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime, stime, cutime, cstime


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) one process has used so far."""
    utime, stime, _, _ = _cpu_jiffies(pid)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _tree_jiffies() -> int:
    """CPU time of this process and every live descendant, each with its reaped children."""
    from .procs import cluster  # noqa: PLC0415

    total = 0
    for pid in [os.getpid(), *cluster.descendants(os.getpid())]:
        try:
            total += sum(_cpu_jiffies(pid))  # with its reaped children
        except OSError:
            continue
    return total


class CpuWatch:
    """How many cores' worth of CPU *other* processes (not the bench's) used during a block.

    The machine is shared; this says how noisy a measurement was. ``other_cores`` is
    set when the block ends (None where /proc is unavailable).
    """

    def __init__(self) -> None:
        self.other_cores: float | None = None

    def __enter__(self) -> CpuWatch:
        try:
            self._start = (time.monotonic(), _busy_jiffies(), _tree_jiffies())
        except OSError:
            self._start = None  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        t0, busy0, ours0 = self._start
        try:
            busy, ours = _busy_jiffies(), _tree_jiffies()
        except OSError:
            return
        seconds = time.monotonic() - t0
        if seconds > 0:
            hz = os.sysconf("SC_CLK_TCK")
            self.other_cores = max(0.0, ((busy - busy0) - (ours - ours0)) / hz / seconds)
