"""Resident-memory figures of this process, for the benchmarks' peak-memory columns (Linux)."""
from __future__ import annotations

import ctypes
import gc


def status_bytes(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` figure of this process from /proc, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Make the peak RSS (VmHWM) restart from the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def give_back_freed_memory() -> None:
    """Collect garbage and hand free heap back to the system, so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
