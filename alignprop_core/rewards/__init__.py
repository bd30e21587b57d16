"""The reward registry: reward name -> factory of a differentiable ``fn(images, prompts) -> Tensor[B]``.

Images are (B, 3, H, W) in [0, 1]; the result is one score per image, higher is better. Factories
keep heavy imports (CLIP, detectors) inside themselves, so importing this registry is cheap.
`REWARDS` fills the CLI choices and the ComfyUI dropdown.
"""
from __future__ import annotations

from typing import Any, Callable

from .base import RewardFn, check_images
from .color import make_color_target
from .smoothness import make_smoothness

REWARDS: dict[str, Callable[..., RewardFn]] = {
    "color_target": make_color_target,
    "smoothness": make_smoothness,
}


def make_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward called `name` with factory keyword arguments `kwargs`."""
    try:
        factory = REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}.") from None
    return factory(**kwargs)


__all__ = ["REWARDS", "RewardFn", "check_images", "make_reward"]
