"""Count the shapes in a toy-world image without any learned weights: connected foreground blobs.

This is the toy world's independent referee. The `toy_count` reward is a neural classifier, and
gradient ascent on a classifier can fool it (pixels change imperceptibly, the prediction flips).
The generator keeps shapes at least two pixels apart, so on a clean image the number of shapes is
the number of 8-connected groups of pixels whose colour differs clearly from the background. That
count cannot be fooled by small perturbations, so the demo (through `toy_count`'s report) shows
it beside the reward. It is not differentiable and is never trained on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FOREGROUND_THRESHOLD = 0.2  # max per-channel |pixel - background| that still counts as background
MIN_AREA_FRACTION = 6 / 1024  # blobs smaller than this share of the image (6 px at 32 px) are specks


def background_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3) median colour of each image's one-pixel border (shapes never touch the border)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0],
                        images[..., 1:-1, -1]], dim=-1)  # (B, 3, perimeter)
    return border.median(dim=-1).values


def foreground_mask(images: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> torch.Tensor:
    """(B, H, W) bool: pixels whose colour is more than `threshold` away from the background."""
    bg = background_colour(images)[..., None, None]
    return (images - bg).abs().amax(dim=1) > threshold


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) long labels of the 8-connected components of `mask` (0 = background).

    Every foreground pixel starts with its own number and repeatedly takes the largest number in
    its 3x3 neighbourhood (inside the mask) until nothing changes, so each component ends up
    labelled by its largest pixel number.
    """
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, 1, h, w).expand(b, 1, h, w)
    fg = mask[:, None].to(torch.float64)
    labels = ids * fg
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * fg
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels[:, 0].long()


@torch.no_grad()
def count_shapes(images: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD,
                 min_area_fraction: float = MIN_AREA_FRACTION) -> torch.Tensor:
    """(B,) number of shapes in images (B, 3, H, W) in [0, 1]: foreground blobs of at least
    `min_area_fraction` of the image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"count_shapes needs images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    images = images.detach().float().cpu()
    labels = label_components(foreground_mask(images, threshold))
    min_area = max(1, round(min_area_fraction * images.shape[-1] * images.shape[-2]))
    counts = []
    for row in labels:
        _, sizes = torch.unique(row[row > 0], return_counts=True)
        counts.append(int((sizes >= min_area).sum()))
    return torch.tensor(counts, dtype=torch.long)
