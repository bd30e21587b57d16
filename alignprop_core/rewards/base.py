"""What every reward shares: the callable type and the input checks run before scoring."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def check_images(images: torch.Tensor, prompts: Sequence[str] | None = None, tol: float = 1e-4) -> None:
    """Raise a ValueError unless images are (B, 3, H, W) in [0, 1] with one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images of shape (B, 3, H, W); got {tuple(images.shape)}. "
                         "Convert ComfyUI IMAGE (B, H, W, 3) with .permute(0, 3, 1, 2).")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"rewards take images in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                         "Map [-1, 1] images with x / 2 + 0.5 first.")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; "
                         "give one prompt per image.")


def check_prompts(prompts: Sequence[str] | None, reward: str) -> list[str]:
    """Raise a ValueError unless every prompt is a non-empty string; return them as a list.

    Args:
        prompts: one prompt per image.
        reward: reward name for the message.
    """
    if prompts is None:
        raise ValueError(f"the {reward} reward compares images with text; give one prompt per image.")
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"the {reward} reward needs a non-empty text prompt for every image; prompts at "
                         f"positions {bad} are empty. Give each image its prompt.")
    return prompts
