"""A weight-free reward: colourfulness (Hasler and Suesstrunk 2003, "Measuring colourfulness in
natural images"), computed with differentiable torch ops.

With rg = R - G and yb = (R + G) / 2 - B over the pixels of an image,
score = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2), on [0, 1] RGB (the paper
uses 0..255, i.e. 255 times these values). Grey images score 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RewardFn, check_images


def make_colourfulness() -> RewardFn:
    """Reward = the Hasler-Suesstrunk colourfulness of each image (higher is more colourful)."""

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        r, g, b = images.float().unbind(1)
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        # eps keeps the gradient finite on perfectly flat images
        spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-12).sqrt()
        offset = (rg.mean(1).pow(2) + yb.mean(1).pow(2) + 1e-12).sqrt()
        return spread + 0.3 * offset

    return reward
