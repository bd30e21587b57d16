"""The measured probe: a few real optimiser steps at small settings, from which `StepCosts` follow.

Three steps of `training.step.optimizer_step` on copies of the run's configs, each with a LoRA of the
run's settings added for it and removed afterwards, its own AdamW and its own generator seeded like
the run's, the reward in `scoring_only()` and the global random state forked, so the real run that
follows starts exactly as it would without the probe:

    P1: W1 window steps, batch 1, denoiser and VAE checkpointed     = fixed + s + u + W1 * latent
    P2: W2 window steps, batch 2, both checkpointed                 = fixed + 2 (s + u + W2 * latent)
    P3: W2 window steps, batch 1, nothing checkpointed              = fixed + s + W2 * u + decode

(s = per_sample, u = denoiser_step; W1 = 1 and W2 = 2 for truncated backprop, both 1 + n for
DRaFT-LV.) Each is the peak above the memory held before the probe (`host_memory.PeakMeter`: RSS on
the CPU, allocated bytes on CUDA). `decode`, the decoder's activations kept without checkpointing,
is counted directly in P3 as the bytes autograd saves inside the decode; the latent's size is known.
P1 and P2 give fixed and s + u, P3 gives u. If P3 runs out of device memory, settings without
checkpointing are left out of the plan instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import torch

from ..config import LoraConfig, SamplerConfig, TrainConfig
from ..lora import add_lora, remove_lora
from ..models.backend import DiffusionBackend
from ..rewards import Reward, RewardFn, as_reward
from ..rewards.base import reward_modules
from ..training.step import make_optimizer, make_scaler, optimizer_step
from .estimate import StepCosts, window_steps
from .host_memory import PeakMeter


class SavedBytes:
    """Bytes autograd saves for backward inside `watch`ed calls, each storage counted once; parameters
    (frozen weights are saved by reference) are left out."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        ptr = t.untyped_storage().data_ptr()
        if not isinstance(base, torch.nn.Parameter) and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def watch(self, fn: Callable) -> Callable:
        """`fn` with what it saves for backward counted."""
        def counted(*args):
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                return fn(*args)
        return counted


def _probe_configs(sampler: SamplerConfig, cfg: TrainConfig, k: int, batch: int, checkpoint: bool
                   ) -> tuple[SamplerConfig, TrainConfig]:
    if sampler.estimator == "truncated":
        sampler = dataclasses.replace(sampler, truncation="fixed", k=k)
    sampler = dataclasses.replace(sampler, checkpoint_unet=checkpoint, checkpoint_vae=checkpoint)
    return sampler, dataclasses.replace(cfg, batch_size=batch, grad_accum=1, lr_warmup_steps=0)


def _peak_of_step(meter: PeakMeter, backend: DiffusionBackend, reward: Reward, prompts: Sequence[str],
                  lora: LoraConfig, sampler: SamplerConfig, cfg: TrainConfig) -> int:
    """Peak above the meter's baseline of one optimiser step on a throwaway LoRA."""
    meter.start()
    params = add_lora(backend.lora_target, lora, device=backend.device)
    try:
        optimizer = make_optimizer(params, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        optimizer_step(backend, reward, prompts, sampler, cfg, params, optimizer,
                       make_scaler(backend.device, cfg), gen, step=0)
        return meter.peak_above_baseline()
    finally:
        remove_lora(backend.lora_target)


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def probe_costs(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
                sampler: SamplerConfig, lora: LoraConfig, cfg: TrainConfig) -> StepCosts:
    """Measure the terms of the memory model with three small optimiser steps.

    Args:
        backend: the loaded model, without LoRA (the probe adds its own and removes it).
        reward, prompts: the run's reward and training prompts.
        sampler, lora, cfg: the run's configs; the probe changes only K, the batch and checkpointing.

    Returns:
        StepCosts with `baseline` the memory held before the probe.

    Raises:
        RuntimeError: the smallest probe step (batch 1, checkpointed) does not fit the device.
    """
    reward = as_reward(reward, cfg.reward)
    w1 = 1 if sampler.estimator == "truncated" else window_steps(sampler)
    w2 = min(2, sampler.steps) if sampler.estimator == "truncated" else w1
    w3 = min(3, sampler.steps) if sampler.estimator == "truncated" else w1
    meter = PeakMeter(backend.device)
    shape = backend.latent_shape(1, cfg.height, cfg.width)
    latent = shape[1] * shape[2] * shape[3] * torch.finfo(torch.float32).bits // 8
    with _fork_rng(backend.device), reward.scoring_only():
        try:
            p1 = _peak_of_step(meter, backend, reward, prompts, lora,
                               *_probe_configs(sampler, cfg, w1, 1, True))
        except torch.cuda.OutOfMemoryError as err:
            raise RuntimeError(f"the memory probe's smallest step (batch 1, K = {w1}, checkpointed) already "
                               f"runs out of device memory at {cfg.width}x{cfg.height}; free device "
                               "memory or lower the image size.") from err
        saved = SavedBytes()
        watched = dataclasses.replace(backend, decode=saved.watch(backend.decode))
        try:
            p3 = _peak_of_step(meter, watched, reward, prompts, lora,
                               *_probe_configs(sampler, cfg, w3, 1, False))
        except torch.cuda.OutOfMemoryError:
            p3 = None
        p2 = _peak_of_step(meter, backend, reward, prompts, lora, *_probe_configs(sampler, cfg, w2, 2, True))
    meter.settle()
    weights = reward_weight_bytes(reward, backend.device)
    a = p1 - w1 * latent  # fixed + s + u
    b = p2 - 2 * w2 * latent  # fixed + 2 (s + u)
    fixed, s_u = max(2 * a - b, 0), max(b - a, 0)
    if p3 is None:
        return StepCosts(meter.baseline, fixed, s_u, latent, None, None, weights)
    decode = saved.bytes
    step = max(p3 - decode - a, 0) / (w3 - 1) if w3 > 1 else 0
    step = int(min(step, s_u))  # s + u bounds u: a window step cannot cost more than a whole image
    return StepCosts(meter.baseline, fixed, s_u - step, latent, step, decode, weights)


def reward_weight_bytes(reward: Reward | RewardFn, device: torch.device) -> int:
    """Bytes of the reward's networks (`Reward.modules()`) held on `device`; 0 on the CPU, where
    offloading to the CPU frees nothing, and for a reward that is elsewhere already."""
    if device.type == "cpu":
        return 0
    seen, total = set(), 0
    for module in reward_modules(reward):
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == device.type and id(t) not in seen:  # a network listed twice counts once
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
