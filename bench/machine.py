"""The machine a benchmark ran on: CPU model, cores, torch version, device, threads and system load."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch


@dataclass
class Machine:
    """What the results depend on, recorded next to them."""

    cpu: str
    cores: int
    torch: str
    device: str
    threads: int
    python: str
    load_start: tuple[float, float, float]  # 1/5/15-minute load averages when the run began

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float]:
    """os.getloadavg(), or zeros where the platform has none."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (0.0, 0.0, 0.0)


def describe(device: str, threads: int) -> Machine:
    """The current machine."""
    name = cpu_model()
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{name} + {torch.cuda.get_device_name(0)}"
    return Machine(cpu=name, cores=os.cpu_count() or 1, torch=torch.__version__, device=device,
                   threads=threads, python=platform.python_version(), load_start=load_average())
