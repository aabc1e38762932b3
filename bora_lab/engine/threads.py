"""How many torch CPU threads a comparison gets: the cores other processes leave idle *now*.

torch's threads wait for each other at every operation, so a core taken by another process stalls
them all (measured on a 2-core machine: SmolLM2 steps took 80 s on 2 threads beside other jobs, 8 s
on 1). The choice therefore counts the cores that are busy, but only with *other* processes, and
only *now*: a short sample of ``/proc/stat`` minus this process's own CPU time over the same
window. (The 1-minute load average used before lagged by minutes and counted BoRA Lab's own
start-up and previous comparison, so a second Run on an idle machine got one thread.)

Where ``/proc`` is missing (macOS, Windows) torch's default is kept.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

SAMPLE_S = 0.25  # long enough to see a busy process, short enough not to delay a Run
BUSY_SHARE = 0.75  # a core counts as free unless other processes keep it more than 75% busy


@dataclass
class CpuSample:
    """CPU time over one window, in clock ticks: all cores together, their busy part, and ours."""

    total: float  # elapsed ticks summed over every core
    busy: float  # busy ticks (not idle, not iowait) summed over every core
    own: float  # this process's user + system ticks (all its threads)
    cores: int


def _read_proc() -> tuple[float, float, float]:
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    with open("/proc/self/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()  # fields after the command name
    own = float(stat[11]) + float(stat[12])  # utime, stime (fields 14 and 15)
    return sum(fields[:8]), sum(fields[:8]) - idle, own


def sample_cpu(interval: float = SAMPLE_S) -> CpuSample | None:
    """CPU use over the next ``interval`` seconds, or None where ``/proc`` cannot be read."""
    try:
        t0, b0, o0 = _read_proc()
        time.sleep(interval)
        t1, b1, o1 = _read_proc()
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(total=t1 - t0, busy=b1 - b0, own=o1 - o0, cores=os.cpu_count() or 1)


def choose_threads(default: int, sample: Callable[[], CpuSample | None] = sample_cpu) -> tuple[int, str]:
    """``(threads, reason)``: ``default`` (torch's) lowered to the cores other processes leave idle now.

    Args:
        default: torch's own thread count (usually the number of cores).
        sample: measures the CPU (tests pass a fake busy or idle machine).
    """
    s = sample()
    if s is None or s.total <= 0:
        return default, f"torch's default ({default}; CPU load could not be sampled here)"
    per_core = s.total / s.cores  # ticks one core had in the window
    others = max(0.0, (s.busy - s.own) / per_core)  # cores' worth of other processes' work
    idle = s.cores - others
    n = max(1, min(default, math.ceil(idle - (1 - BUSY_SHARE))))
    busy = "idle" if others < 0.05 else f"busy with other processes ({others:.1f} core{'s' if others >= 1.05 else ''})"
    return n, f"auto: {s.cores} core{'s' if s.cores != 1 else ''}, {busy} now"
