"""How much memory this process holds and may still take: resident-set probes (Linux /proc), the
device's free memory, and returning freed heap to the OS.

Peak RSS is read from VmHWM; writing "5" to /proc/self/clear_refs resets that high-water mark, so the
peak of one phase can be measured after setup. `trim_heap` calls glibc's malloc_trim so freed tensor
memory that the allocator still holds is handed back (allocator retention counts against a peak).
`PeakMeter` measures one phase's peak above a baseline the same way on CPU (RSS) and CUDA (the
caching allocator's allocated bytes).
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch


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


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo: what the host can still give without swapping."""
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable; give the memory budget as a number of GB.")


def used_bytes(device: torch.device) -> int:
    """What this process holds now: the CUDA allocator's allocated bytes, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return rss_bytes()
    raise ValueError(f"memory planning measures cpu and cuda devices, not {device.type}; give no memory "
                     "budget on this device.")


def usable_bytes(device: torch.device) -> int:
    """The most this process can hold: what it holds now plus the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    return available_host_bytes() + used_bytes(device)


class PeakMeter:
    """Peak memory of a phase above a fixed baseline, on the CPU (RSS) or a CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.settle()
        self.baseline = used_bytes(device)

    def settle(self) -> None:
        """Hand freed memory back, so the next phase's peak starts from what is live."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        else:
            trim_heap()

    def start(self) -> None:
        """Begin a phase: its peak is tracked from now."""
        self.settle()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak():
            raise RuntimeError("the resident-memory peak cannot be reset (/proc/self/clear_refs is not "
                               "writable here); give no memory budget on this machine.")

    def peak_above_baseline(self) -> int:
        """The phase's peak minus the baseline taken at construction."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return peak_rss_bytes() - self.baseline
