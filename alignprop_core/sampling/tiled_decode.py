"""VAE decode in overlapping spatial tiles, so the decoder's activations are bounded by one tile
(`SamplerConfig.vae_tile`, `vae_tile_overlap`).

The latents are cut into square tiles of `tile` latent cells whose neighbours overlap by at least
`overlap` cells (the tiles are spread evenly, so the last one ends at the border). Each tile is decoded
on its own, checkpointed when asked (backward then recomputes one tile at a time), and the decoded
tiles are blended with weights that form a partition of unity over every overlap of exactly
`overlap` cells:

    w(d) = clamp((d - o/4) / (o/2), 0, 1)

on a side that has a neighbour, d being a pixel centre's distance from that side and o the overlap in
pixels (1 on a side at the image border; a tile's weight is the product over its sides). The quarter
of the overlap next to a tile's inner edge counts for nothing, so a decoder that only sees o/4 pixels
around each output pixel gives exactly the untiled image. A real VAE decoder sees further (its
GroupNorm statistics and its attention span the whole tile), so tiled images differ a little from
untiled ones, most near the seams; everything stays differentiable.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents (B, C, h, w) -> images (B, 3, f h, f w)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """First cell of each tile of `tile` cells covering `size` cells, neighbours overlapping by at
    least `overlap` cells (one tile if it covers everything)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, overlap_px: int, before: bool, after: bool) -> torch.Tensor:
    """(length,) blending weights of one tile along one axis; `before` / `after`: that side has a
    neighbouring tile."""
    d = torch.arange(length, dtype=torch.float64) + 0.5  # pixel centres from the tile's start
    w = torch.ones(length, dtype=torch.float64)
    if overlap_px > 0:
        if before:
            w = torch.minimum(w, ((d - overlap_px / 4) / (overlap_px / 2)).clamp(0, 1))
        if after:
            w = torch.minimum(w, ((length - d - overlap_px / 4) / (overlap_px / 2)).clamp(0, 1))
    return w


def tiled_decode(decode: Decode, latents: torch.Tensor, tile: int, overlap: int, factor: int,
                 use_checkpoint: bool) -> torch.Tensor:
    """Decode `latents` (B, C, h, w) tile by tile and blend the tiles into one image batch.

    Args:
        decode: the untiled decoder, latents -> images (B, 3, factor h, factor w).
        tile: tile side in latent cells (> 2 overlap).
        overlap: least overlap of neighbouring tiles in latent cells.
        factor: image pixels per latent cell.
        use_checkpoint: checkpoint each tile's decode (only when gradient is being recorded).

    Returns:
        Images (B, 3, factor h, factor w), differentiable w.r.t. `latents`.
    """
    h, w = latents.shape[-2:]
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    recompute = use_checkpoint and torch.is_grad_enabled() and latents.requires_grad
    out = weight = None
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            part = latents[..., y:y + tile, x:x + tile]
            image = checkpoint(decode, part, use_reentrant=False) if recompute else decode(part)
            th, tw = image.shape[-2:]
            wy = _ramp(th, overlap * factor, i > 0, i < len(rows) - 1)
            wx = _ramp(tw, overlap * factor, j > 0, j < len(cols) - 1)
            mask = (wy[:, None] * wx[None, :]).to(image.device, image.dtype)  # (th, tw)
            if out is None:
                out = image.new_zeros(*image.shape[:2], h * factor, w * factor)
                weight = torch.zeros(h * factor, w * factor, dtype=image.dtype, device=image.device)
            py, px = y * factor, x * factor
            out[..., py:py + th, px:px + tw] += image * mask
            weight[py:py + th, px:px + tw] += mask
    return out / weight
