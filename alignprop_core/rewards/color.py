"""A weight-free reward: closeness of an image's mean colour to a target colour.

Used by the embedded demo because it needs no download and its effect is visible at a glance.
Score = -||mean_rgb(image) - target||_2, so the maximum is 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RewardFn, check_images


def make_color_target(target: Sequence[float] = (1.0, 0.55, 0.1)) -> RewardFn:
    """Reward images whose mean RGB is close to `target` (each channel in [0, 1])."""
    target = tuple(float(c) for c in target)
    if len(target) != 3 or not all(0.0 <= c <= 1.0 for c in target):
        raise ValueError(f"color_target target must be three numbers in [0, 1] (R, G, B); got {target}.")

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        goal = torch.tensor(target, device=images.device, dtype=images.dtype)
        mean_rgb = images.mean(dim=(2, 3))  # (B, 3)
        # eps keeps the gradient finite when the image hits the target exactly
        return -((mean_rgb - goal).pow(2).sum(dim=1) + 1e-12).sqrt()

    return reward
