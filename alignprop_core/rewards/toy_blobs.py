"""toy_blobs: the toy world's weight-free referee as a reward, for judging held-out images.

Each image scores 1.0 when the number of separate blobs in its pixels (`toy.counting.count_shapes`:
8-connected groups of pixels that differ clearly from the background) equals the count its prompt
asks for ("three red circles on a black background" asks for 3), else 0.0. The mean over a set of
images is their blob-count accuracy.

A blob count cannot be fooled the way the `toy_count` classifier can (imperceptible pixel changes
that flip a CNN's prediction), so it tells whether a rising toy_count reward means more correct
drawings or a fooled classifier. The score is a step function of the pixels with no gradient:
the reward says so (`differentiable = False`), and the trainer refuses it as the training reward.
Use it as a judge (`TrainConfig.judges`, `--judges toy_blobs`). It needs no weights.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Reward, check_images, check_prompts
from .spec import RewardSpec
from .toy_count import toy_targets


class BlobCountReward(Reward):
    """1.0 per image whose blob count equals the prompt's requested count, else 0.0."""

    differentiable = False  # a count of connected components has no gradient

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from alignprop_core.toy.counting import count_shapes

        check_images(images, prompts)
        wanted = toy_targets(check_prompts(prompts, "toy_blobs"), ("count",), "toy_blobs")[:, 0] + 1
        return (count_shapes(images) == wanted).float().to(images.device)


def make_toy_blobs() -> BlobCountReward:
    """The blob-count referee of the toy world (no arguments, no weights)."""
    return BlobCountReward(RewardSpec("toy_blobs"))
