"""DDPO (Black et al. 2023, "DDPO_IS"), written for the benchmark as the RL baseline of item 4.

Follows the procedure of TRL 0.23's `DDPOTrainer` (read, not copied): per epoch, sample images with
stochastic DDIM (eta = 1) recording every latent and the log-probability of every transition under the
sampling policy; score the images with the reward; normalise rewards to advantages over the epoch's
samples and clip them; then, for each training batch and every denoising transition, recompute the
transition's log-probability under the current LoRA (with classifier-free guidance), form the
importance ratio and minimise PPO's clipped surrogate, accumulating gradients over the transitions and
taking one clipped AdamW step per training batch. Defaults are TRL's (lr 3e-4, clip range 1e-4,
advantage clip 5, max grad norm 1, one inner epoch, all timesteps).

Each image sampled is one reward query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from alignprop_core.sampling.conditioning import batch_conds
from alignprop_core.models.backend import Cond, DiffusionBackend
from alignprop_core.rewards import RewardFn
from alignprop_core.sampling.sampler import guided_prediction
from alignprop_core.sampling.schedule import split_prediction


@dataclass
class DDPOConfig:
    steps: int = 20  # T, DDIM steps of the sampling policy
    eta: float = 1.0
    guidance: float = 7.5
    samples_per_epoch: int = 32
    sample_batch: int = 16
    train_batch: int = 4
    lr: float = 3e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    negative_prompt: str = ""


def _transition_stats(backend: DiffusionBackend, x_t: torch.Tensor, t: int, t_prev: int, cond: Cond,
                      uncond: Cond, cfg: DDPOConfig) -> tuple[torch.Tensor, float]:
    """Mean of p(x_{t_prev} | x_t) under the current model, and its standard deviation sigma_t."""
    sched = backend.schedule
    out = guided_prediction(backend.denoiser, x_t, t, cond, uncond, cfg.guidance)
    ab_t, ab_prev = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    x0, eps = split_prediction(out, x_t, ab_t, sched.prediction_type)
    variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    sigma = cfg.eta * max(variance, 0.0) ** 0.5
    mean = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return mean, sigma


def _log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-sample Gaussian log-density, averaged over latent dimensions (as DDPO does)."""
    lp = -((x_prev - mean) ** 2) / (2 * sigma ** 2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


@torch.no_grad()
def sample_trajectories(backend: DiffusionBackend, prompts: Sequence[str], cfg: DDPOConfig, px: int,
                        gen: torch.Generator) -> dict:
    """Stochastic DDIM rollouts: latents (T+1, B, ...), log-probs (T, B), images, timesteps."""
    cond = backend.encode_prompts(list(prompts))
    uncond = backend.encode_prompts([cfg.negative_prompt] * len(prompts))
    x = torch.randn(backend.latent_shape(len(prompts), px, px), generator=gen)
    sched = backend.schedule
    ts = sched.timesteps(cfg.steps)
    latents, log_probs = [x], []
    for t in ts:
        t_prev = sched.previous_timestep(t, cfg.steps)
        mean, sigma = _transition_stats(backend, x, t, t_prev, cond, uncond, cfg)
        x = mean + sigma * torch.randn(x.shape, generator=gen)
        log_probs.append(_log_prob(x, mean, sigma))
        latents.append(x)
    return {"latents": torch.stack(latents), "log_probs": torch.stack(log_probs),
            "images": backend.decode(x), "timesteps": ts, "cond": cond, "uncond": uncond}


def ddpo_epoch(backend: DiffusionBackend, reward_fn: RewardFn, prompts: Sequence[str], cfg: DDPOConfig,
               px: int, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               gen: torch.Generator) -> dict:
    """One DDPO epoch: sample `samples_per_epoch` images (= reward queries), then train on them."""
    # 1. sampling (no grad)
    chunks = []
    for start in range(0, cfg.samples_per_epoch, cfg.sample_batch):
        n = min(cfg.sample_batch, cfg.samples_per_epoch - start)
        idx = torch.randint(len(prompts), (n,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        traj = sample_trajectories(backend, batch_prompts, cfg, px, gen)
        with torch.no_grad():
            traj["rewards"] = reward_fn(traj["images"].float(), batch_prompts).float()
        chunks.append(traj)
    latents = torch.cat([c["latents"] for c in chunks], dim=1)  # (T+1, N, ...)
    old_lp = torch.cat([c["log_probs"] for c in chunks], dim=1)  # (T, N)
    rewards = torch.cat([c["rewards"] for c in chunks])
    cond = batch_conds([c["cond"] for c in chunks])  # prompts of different token lengths batch too
    uncond = batch_conds([c["uncond"] for c in chunks])
    ts = chunks[0]["timesteps"]

    # 2. advantages over the epoch's samples, clipped
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)

    # 3. PPO updates: shuffle samples; per batch, every transition in shuffled order, one AdamW step
    perm = torch.randperm(len(rewards), generator=gen)
    clipped = []
    for start in range(0, len(perm), cfg.train_batch):
        b = perm[start:start + cfg.train_batch]
        optimizer.zero_grad(set_to_none=True)
        for j in torch.randperm(len(ts), generator=gen).tolist():
            t, t_prev = ts[j], backend.schedule.previous_timestep(ts[j], cfg.steps)
            mean, sigma = _transition_stats(backend, latents[j][b], t, t_prev,
                                            {k: v[b] for k, v in cond.items()},
                                            {k: v[b] for k, v in uncond.items()}, cfg)
            lp = _log_prob(latents[j + 1][b], mean, sigma)
            ratio = torch.exp(lp - old_lp[j][b])
            unclipped = -adv[b] * ratio
            clip = -adv[b] * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
            loss = torch.maximum(unclipped, clip).mean() / len(ts)
            loss.backward()
            clipped.append(float(((ratio - 1).abs() > cfg.clip_range).float().mean()))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    return {"reward": float(rewards.mean()), "queries": len(rewards),
            "clip_fraction": sum(clipped) / max(len(clipped), 1)}
