"""A training run's progress as small JSON messages, for a view that draws it while it runs.

`LiveRun` keeps what such a view draws: the training reward of every step (raw, and smoothed by a
bias-corrected exponential moving average), the held-out reward of every evaluation, step / total
with the elapsed time and an ETA, the latest preview image and the last LoRA file written. It hands
out a message at most every `min_interval` seconds (`due`), and each message holds only the points
added since the previous one, so a message costs the same at step 10 and at step 10 000. `state()`
is the whole run in the same form (points from index 0): what a viewer that (re)connects mid-run
asks for. Non-finite rewards (a skipped step) are sent as null, which JSON can carry.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

STATUSES = ("running", "finished", "cancelled", "failed")


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class LiveRun:
    """The progress of one training run, for a live view (see the module docstring).

    Args:
        run_id: names the run in every message (a viewer drops points of another run).
        total: the number of optimiser steps the run will make.
        smoothing: weight of the past in the moving average (0: no smoothing).
        min_interval: the least time between two messages, in seconds.
        clock: seconds, monotonic (tests pass a fake one).
    """
    run_id: str
    total: int
    smoothing: float = 0.9
    min_interval: float = 0.5
    clock: Callable[[], float] = time.monotonic
    status: str = "running"
    step: int = 0
    points: list[list[float | None]] = field(default_factory=list)  # [step, reward, smoothed]
    evals: list[list[float | None]] = field(default_factory=list)  # [step, held-out reward]
    preview: dict[str, Any] | None = None
    lora_path: str | None = None
    error: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        self._started = self.clock()
        self._rate_start: tuple[float, int] | None = None  # (time, step) of the first step seen
        self._ema = 0.0
        self._ema_weight = 0.0
        self._sent_points = 0
        self._sent_evals = 0
        self._sent_preview: dict[str, Any] | None = None
        self._sent_lora: str | None = None
        self._last_sent = -math.inf

    # -- what the run reports ----------------------------------------------------------------------
    def add_step(self, step: int, reward: float) -> None:
        """The training reward of optimiser step `step`."""
        if self._rate_start is None:  # from the start of the run, so the first step's time counts
            self._rate_start = (self._started, step - 1)
        self.step = step
        value = _finite(reward)
        if value is not None:
            self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * value
            self._ema_weight = self.smoothing * self._ema_weight + (1.0 - self.smoothing)
        smoothed = self._ema / self._ema_weight if self._ema_weight else None
        self.points.append([step, value, smoothed])

    def add_eval(self, step: int, reward: float) -> None:
        """The held-out reward after `step` optimiser steps (0: before training)."""
        self.evals.append([step, _finite(reward)])

    def set_preview(self, preview: dict[str, Any]) -> None:
        """The latest preview (whatever the viewer needs to show it: a file reference, prompt, score)."""
        self.preview = dict(preview)

    def set_lora(self, path: str) -> None:
        """The LoRA file written last."""
        self.lora_path = str(path)

    def finish(self, status: str, error: str = "") -> None:
        """The run ended: finished, cancelled or failed (with what went wrong)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}")
        self.status, self.error = status, error

    # -- what a viewer gets ------------------------------------------------------------------------
    def eta_s(self) -> float | None:
        """Seconds to the last step at the rate so far; None before the rate is known."""
        if self._rate_start is None or self.status != "running":
            return None if self.status == "running" else 0.0
        t0, s0 = self._rate_start
        done = self.step - s0
        return (self.clock() - t0) / done * max(self.total - self.step, 0) if done > 0 else None

    def due(self) -> bool:
        """Whether a message may go now: `min_interval` since the last, or the run has ended."""
        return self.status != "running" or self.clock() - self._last_sent >= self.min_interval

    def message(self) -> dict[str, Any]:
        """What changed since the last message (and marks it sent)."""
        out = self._snapshot(self._sent_points, self._sent_evals)
        if self.preview is not None and self.preview != self._sent_preview:
            out["preview"] = self.preview
        if self.lora_path != self._sent_lora:
            out["lora_path"] = self.lora_path
        self._sent_points, self._sent_evals = len(self.points), len(self.evals)
        self._sent_preview, self._sent_lora = self.preview, self.lora_path
        self._last_sent = self.clock()
        return out

    def state(self) -> dict[str, Any]:
        """The whole run, in the form of a message that starts at the first point."""
        return {**self._snapshot(0, 0), "preview": self.preview, "lora_path": self.lora_path}

    def _snapshot(self, points_from: int, evals_from: int) -> dict[str, Any]:
        return {"run": self.run_id, "status": self.status, "step": self.step, "total": self.total,
                "elapsed_s": self.clock() - self._started, "eta_s": self.eta_s(), "error": self.error,
                "points_from": points_from, "points": [list(p) for p in self.points[points_from:]],
                "evals_from": evals_from, "evals": [list(e) for e in self.evals[evals_from:]]}
