"""The memory planner: estimate a run's peak memory from a short measured probe and pick the fastest
settings that fit a budget.

* ``host_memory``: what the process holds and may take (RSS, CUDA allocator, free memory), peaks,
* ``estimate``: the memory and time model of one optimiser step (`StepCosts`, `Setting`),
* ``probe``: three small real optimiser steps that measure the model's terms,
* ``plan``: the candidates, the chooser and the `Plan` it prints and applies,
* ``planner``: all of it as one call, `plan_memory`,
* ``cards``: the plans for well-known models and card sizes, by calculation (``python -m
  alignprop_core.planning.cards``).
"""
from .estimate import GB, Setting, StepCosts, estimate_peak, relative_time, setting_of, window_steps
from .plan import HEADROOM, Candidate, Plan, choose_plan
from .planner import budget_bytes, plan_memory
from .probe import probe_costs

__all__ = ["GB", "Setting", "StepCosts", "estimate_peak", "relative_time", "setting_of", "window_steps",
           "HEADROOM", "Candidate", "Plan", "choose_plan", "budget_bytes", "plan_memory", "probe_costs"]
