"""A weight-free compressibility proxy: negative mean total variation of the image.

Smooth images compress well, so this is a cheap stand-in for the JPEG-size reward of the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RewardFn, check_images


def make_smoothness() -> RewardFn:
    """Reward = -(mean |dx| + mean |dy|) over pixels and channels, in [-2, 0]."""

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        return -(dx + dy)

    return reward
