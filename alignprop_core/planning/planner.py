"""The memory planner as one call: resolve the budget, probe the model, choose the settings.

`plan_memory` runs before `training.run.TrainRun` is created (the probe adds and removes its own
LoRA); the caller prints `Plan.describe()` and trains with `Plan.apply(sampler, cfg)`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import LoraConfig, MemoryConfig, SamplerConfig, TrainConfig
from ..models.backend import DiffusionBackend
from ..rewards import Reward, RewardFn
from .estimate import GB
from .host_memory import usable_bytes
from .plan import Plan, choose_plan
from .probe import probe_costs


def budget_bytes(memory: MemoryConfig, device: torch.device) -> int:
    """The budget in bytes: MemoryConfig.budget_gb, or with auto what `device` can give now."""
    if memory.auto:
        return usable_bytes(device)
    return int(memory.budget_gb * GB)


def plan_memory(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
                sampler: SamplerConfig, lora: LoraConfig, cfg: TrainConfig, memory: MemoryConfig) -> Plan:
    """Probe one small step of this run and choose the fastest settings within the budget.

    Args:
        backend: the loaded model, without LoRA; it is left as it was.
        reward, prompts: the run's reward and training prompts.
        sampler, lora, cfg: the run's configs.
        memory: the budget (MemoryConfig.enabled must be True).

    Returns:
        The plan; `Plan.apply(sampler, cfg)` gives the configs to train with.

    Raises:
        ValueError: no setting fits the budget (the message names the smallest estimate).
    """
    if not memory.enabled:
        raise ValueError("MemoryConfig has no budget; give budget_gb > 0 or auto=True to plan.")
    budget = budget_bytes(memory, backend.device)  # before the probe: auto reads the free memory now
    costs = probe_costs(backend, reward, prompts, sampler, lora, cfg)
    return choose_plan(costs, sampler, cfg, budget)
