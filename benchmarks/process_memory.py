"""Memory readings of the current process from Linux's /proc, shared by the benchmark scripts.

Each benchmark row runs in a fresh process that builds its inputs, gives freed heap back to the system
(`easyanimate.memory.release_freed_memory`), resets the peak counter, runs, and reads the peak.
"""
from __future__ import annotations

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
