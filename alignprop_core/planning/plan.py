"""Choosing the settings of a run from a memory budget: candidates, their estimates, the fastest fit.

Only choices that leave the algorithm as it is are changed: the batch of an optimiser step is split
into micro-batches (`batch_size * grad_accum` stays the images per step; the gradient is the same
mean, though the random draws are taken in a different order), gradient checkpointing of the
denoiser and the VAE is turned on or off, and, where the reward's networks sit on the training
device, they may be offloaded between scoring passes (the same LoRA, bit for bit). K, the image size and everything else stay the user's.
Among the candidates whose estimate (with `HEADROOM`) fits the budget, the fastest by
`estimate.relative_time` wins; ties go to the smaller estimate.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..config import SamplerConfig, TrainConfig
from .estimate import GB, Setting, StepCosts, can_estimate, estimate_peak, relative_time, setting_of

HEADROOM = 0.10  # margin for what the model leaves out: allocator fragmentation, prompt cache growth


@dataclass
class Candidate:
    """One setting with its estimated peak (bytes) and relative step time."""

    setting: Setting
    peak: int
    time: float
    fits: bool


@dataclass
class Plan:
    """The candidates considered for a budget and the one chosen."""

    budget: int  # bytes the run may use at its peak
    costs: StepCosts  # the memory model's terms
    candidates: list[Candidate]  # fastest first
    chosen: Candidate
    asked: Setting  # what the configs asked for before planning

    def apply(self, sampler: SamplerConfig, cfg: TrainConfig) -> tuple[SamplerConfig, TrainConfig]:
        """The configs with the chosen batch split and checkpointing."""
        s = self.chosen.setting
        return (dataclasses.replace(sampler, checkpoint_unet=s.checkpoint_unet, checkpoint_vae=s.checkpoint_vae),
                dataclasses.replace(cfg, batch_size=s.batch, grad_accum=s.grad_accum, offload_reward=s.offload_reward))

    def describe(self) -> str:
        """A short table of the candidates, their estimates and the chosen one."""
        fastest = min(c.time for c in self.candidates)
        lines = [f"memory plan: budget {self.budget / GB:.2f} GB, held before training "
                 f"{self.costs.baseline / GB:.2f} GB, {HEADROOM:.0%} headroom",
                 f"  {'batch x accum, checkpointing':<40} {'estimate':>10} {'time':>6}  fits"]
        for c in self.candidates:
            mark = ("  <- chosen" if c is self.chosen else "") + ("  (asked)" if c.setting == self.asked else "")
            lines.append(f"  {c.setting.label():<40} {c.peak / GB:>7.2f} GB {c.time / fastest:>6.2f}  "
                         f"{'yes' if c.fits else 'no'}{mark}")
        return "\n".join(lines)


def _splits(images: int) -> list[tuple[int, int]]:
    """(batch, grad_accum) pairs with batch * grad_accum == images, largest batch first."""
    return [(b, images // b) for b in range(images, 0, -1) if images % b == 0]


def choose_plan(costs: StepCosts, sampler: SamplerConfig, cfg: TrainConfig, budget: int) -> Plan:
    """The fastest setting whose estimated peak, plus `HEADROOM`, fits `budget` bytes.

    Raises:
        ValueError: nothing fits; the message names the smallest estimate and what to change.
    """
    asked = setting_of(sampler, cfg)
    chain_k = 1 if sampler.estimator == "draft_lv" else asked.window
    candidates = []
    # offloading a reward that is not on the device (or on the CPU, where parking frees nothing) is moot
    offloads = (False, True) if costs.reward_weights > 0 else (asked.offload_reward,)
    for (batch, accum), unet, vae, offload in itertools.product(_splits(cfg.batch_size * cfg.grad_accum),
                                                               (False, True), (False, True), offloads):
        setting = Setting(asked.window, batch, accum, unet, vae, offload)
        if not can_estimate(costs, setting) or (offload and not unet and costs.reward_weights > 0):
            continue
        peak = estimate_peak(costs, setting)
        candidates.append(Candidate(setting, peak, relative_time(setting, sampler.steps, chain_k),
                                    peak * (1 + HEADROOM) <= budget))
    candidates.sort(key=lambda c: (c.time, c.peak))
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.peak)
        raise ValueError(
            f"no setting fits the memory budget of {budget / GB:.2f} GB: the smallest estimate is "
            f"{smallest.peak / GB:.2f} GB ({smallest.setting.label()}; {costs.baseline / GB:.2f} GB of it is "
            f"held before training) plus {HEADROOM:.0%} headroom. Lower K (the gradient window, now "
            f"{asked.window} steps), the image size ({cfg.width}x{cfg.height}) or the LoRA rank, or give a "
            "larger memory budget.")
    return Plan(budget, costs, candidates, fitting[0], asked)
