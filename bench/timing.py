"""Timing helpers: interleaved repetitions and medians, so two measured functions share the same load."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_call(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                        ) -> dict[str, list[float]]:
    """Call every function in turn `repeats` times (after `warmup` untimed rounds).

    Interleaving (a, b, a, b, ...) exposes both to the same background load, so their ratio is
    fair even when absolute times drift.

    Returns:
        name -> list of per-call seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios num[i] / den[i] (rounds were measured back to back)."""
    return statistics.median(n / d for n, d in zip(num, den))
