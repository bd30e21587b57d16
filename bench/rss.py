"""Resident-memory probes for the current process (Linux /proc), and returning freed heap to the OS.

Peak RSS is read from VmHWM; writing "5" to /proc/self/clear_refs resets that high-water mark, so the
peak of one phase can be measured after setup. `trim_heap` calls glibc's malloc_trim so freed tensor
memory that the allocator still holds is handed back (allocator retention counts against a peak).
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Resident high-water mark since start or the last `reset_peak`."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """glibc malloc_trim(0): give free heap pages back to the OS. False off glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
