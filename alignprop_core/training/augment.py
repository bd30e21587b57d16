"""Random transforms that a reward should not notice, applied to training images before the reward.

A reward network's pixel gradient has parts tied to the exact pixel grid (a CNN is not invariant to
mirrors or quarter turns), and backpropagated through the sampler those parts teach the LoRA
texture that moves the network rather than the change the reward stands for. Scoring each training
image through a random transform under which the reward's meaning is unchanged (one draw per image
per step, an expectation over transformations with one sample) keeps what the reward measures and
is meant to average the grid-tied parts out over the steps (on the toy world's count task it showed
no reliable gain: see the README's benchmark section). Evaluation images are never transformed.

- ``none``: the image as sampled.
- ``hflip``: a random left-right mirror; for rewards where left and right are free (aesthetics, most
  photographs).
- ``dihedral``: a random one of the 8 mirrors and quarter turns of a square image; for rewards that
  do not depend on orientation at all (object counts, colourfulness, JPEG size up to its 8x8 blocks).

Not for rewards that read layout ("a cat to the left of a dog") or text. The transforms only move
pixels, so the gradient reaching each image is the reward's gradient moved back by the inverse.
"""
from __future__ import annotations

import torch

from ..config import REWARD_AUGMENTS
from ..parallel.shard import ONE, Shard


def augment_for_reward(images: torch.Tensor, kind: str, generator: torch.Generator, shard: Shard = ONE,
                       blocks: int = 1) -> torch.Tensor:
    """images (B, C, H, W) -> the same images, each through its own random transform of `kind`.

    Draws from `generator` (on the CPU) only when kind is not "none", so runs without augmentation
    keep their random stream. On a rank of a data-parallel run the transforms are drawn for the global
    batch and this rank's rows kept (`images` is `blocks` blocks of this rank's prompts).
    """
    if kind == "none":
        return images
    if kind not in REWARD_AUGMENTS:
        raise ValueError(f"reward augmentation {kind!r} is not known; use one of {', '.join(REWARD_AUGMENTS)}.")
    if kind == "dihedral" and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"reward augmentation 'dihedral' turns images by quarter turns, which needs square "
                         f"images, not {images.shape[-1]}x{images.shape[-2]}; use 'hflip' or square images.")
    n = images.shape[0]
    mirror = shard.randint(2, n, generator, blocks)
    turns = shard.randint(4, n, generator, blocks) if kind == "dihedral" else [0] * n
    out = []
    for image, m, t in zip(images, mirror, turns):
        image = torch.rot90(image, t, dims=(-2, -1)) if t else image
        out.append(image.flip(-1) if m else image)
    return torch.stack(out)
