"""Held-out evaluation: the reward of images sampled from fixed latents, without gradient."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..config import SamplerConfig, TrainConfig
from ..models.backend import DiffusionBackend
from ..rewards import Reward, RewardFn
from ..sampling.sampler import sample_images
from .step import autocast_context


@torch.no_grad()
def evaluate(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
             sampler: SamplerConfig, cfg: TrainConfig, return_images: bool = False
             ) -> tuple[list[float], torch.Tensor | None]:
    """Reward of each held-out image, sampled from fixed latents (seeded by cfg.eval_seed).

    Every prompt is scored cfg.eval_latents times, each time from its own latent; the images
    follow `eval_entries(prompts, cfg)` (the prompt list repeated), so the first len(prompts) are
    the same whatever eval_latents is. The reward scores inside `scoring_only()`: evaluation does
    not move its state (a standardised mixture's statistics).

    Returns:
        (per-image rewards, images (N,3,H,W) on the CPU if return_images else None)
    """
    # only a Reward can keep state that scoring would move; a plain function needs no guard
    scoring = reward.scoring_only() if isinstance(reward, Reward) else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    entries = eval_entries(prompts, cfg)
    shape = backend.latent_shape(len(entries), cfg.height, cfg.width)
    x_T = torch.randn(shape, generator=gen).to(backend.device)
    scores, images = [], []
    with scoring:
        for i in range(0, len(entries), cfg.eval_batch_size):
            chunk = list(entries[i:i + cfg.eval_batch_size])
            with autocast_context(backend.device, cfg.mixed_precision):
                img = sample_images(backend, chunk, sampler, x_T[i:i + len(chunk)],
                                    cfg.negative_prompt, grad_steps=0, generator=gen)
                scores += reward(img.float(), chunk).float().tolist()
            if return_images:
                images.append(img.float().cpu())
    return scores, (torch.cat(images) if return_images else None)


def eval_entries(prompts: Sequence[str], cfg: TrainConfig) -> list[str]:
    """The prompt of each image `evaluate` samples: the list, cfg.eval_latents times over."""
    return list(prompts) * cfg.eval_latents
