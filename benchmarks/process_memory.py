"""Memory readings of the current process from Linux's /proc, shared by the benchmark scripts.

Each benchmark row runs in a fresh process that builds its inputs, gives freed heap back to the system
(`easyanimate.memory.release_freed_memory`), resets the peak counter, runs, and reads the peak.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB, e.g. "VmRSS" (resident now) or "VmHWM" (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def busy_seconds() -> float:
    """CPU time all processes have used since boot, all cores together (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores that other processes kept busy on average since this was made: the machine's CPU time
    (/proc/stat) less this process's own (all its threads)."""

    def __init__(self):
        self.busy, self.own, self.wall = busy_seconds(), time.process_time(), time.perf_counter()

    def cores(self) -> float:
        other = (busy_seconds() - self.busy) - (time.process_time() - self.own)
        return max(0.0, other) / max(time.perf_counter() - self.wall, 1e-9)
