"""Diversity of the held-out images: how different the images of one prompt are from each other.

A LoRA that hacks its reward often collapses onto one picture per prompt (every latent gives the same
image). The evaluation samples each held-out prompt from `TrainConfig.eval_latents` fixed latents; the
mean distance between those images falls when that happens, whatever the reward says.

The distance of two images is the RMS pixel difference (pixels in [0, 1]) after area downsampling to
at most `SIZE` x `SIZE`: small enough to keep every held-out image in memory for a large run, coarse
enough to measure layout and colour rather than pixel noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 32  # the largest side of the copies diversity is measured on


def downsample(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(B, 3, h, w) float CPU copies of images (B, 3, H, W), each side at most `size` (area
    interpolation: every output pixel is the mean of the pixels it covers)."""
    h, w = min(images.shape[-2], size), min(images.shape[-1], size)
    small = images.detach().float()
    if (h, w) != tuple(images.shape[-2:]):
        small = F.interpolate(small, size=(h, w), mode="area")
    return small.cpu()


def mean_pairwise_rms(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of images (N >= 2, any shape after the first dim)."""
    flat = images.reshape(images.shape[0], -1).double()
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"a pairwise distance needs at least two images, got {n}.")
    # differences rather than torch.cdist, whose matrix-product shortcut is not exactly 0 for equal images
    dist = (flat[:, None] - flat[None]).pow(2).mean(-1).sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    return float(dist[i, j].mean())


def held_out_diversity(images: torch.Tensor, n_prompts: int) -> float | None:
    """Mean over prompts of the mean pairwise RMS distance between that prompt's images.

    Args:
        images: (n_prompts * L, 3, H, W) in the order `evaluate.eval_entries` gives (the prompt list
            repeated L times, so image i shows prompt i % n_prompts); downsampled here if larger
            than `SIZE` (pass `downsample`d copies to keep less in memory).
        n_prompts: the number of held-out prompts.

    Returns:
        The diversity, or None when each prompt has only one image (L = 1).
    """
    if n_prompts < 1 or images.shape[0] % n_prompts:
        raise ValueError(f"{images.shape[0]} images cannot be {n_prompts} prompts' images in equal numbers.")
    if images.shape[0] // n_prompts < 2:
        return None
    images = downsample(images)
    return sum(mean_pairwise_rms(images[p::n_prompts]) for p in range(n_prompts)) / n_prompts
