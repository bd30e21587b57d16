"""SamplerConfig.vae_tile: the VAE decodes overlapping tiles and blends them; exact for a decoder whose
reach the blend hides, close for a VAE, differentiable (checkpointed or not), and a run trains with it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.sampler import check_sampler_fits
from alignprop_core.sampling.tiled_decode import tile_starts, tiled_decode
from alignprop_core.training.trainer import train
from tiny_models import make_backend, make_vae

FACTOR = 2  # the tiny models' VAE factor


class LocalDecoder(torch.nn.Module):
    """Latents -> images through convolutions only: each output pixel sees 3 pixels around it
    (a 3x3 conv on the latent grid, x2 upsampling, a 3x3 conv on the pixels)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Upsample(scale_factor=FACTOR), torch.nn.Conv2d(8, 3, 3, padding=1),
                                       torch.nn.Sigmoid()).to(dtype)

    def forward(self, latents):
        return self.net(latents)


def _vae_decode():
    vae = make_vae(torch.float32)
    return lambda latents: (vae.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1)


def test_tiles_cover_everything_with_at_least_the_overlap():
    assert tile_starts(8, 16, 4) == [0]
    for size, tile, overlap in [(32, 16, 4), (33, 16, 6), (100, 24, 8), (17, 16, 0)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(tile - (b - a) >= overlap for a, b in zip(starts, starts[1:])), starts


def test_one_tile_covering_the_image_is_the_untiled_decode():
    decode = _vae_decode()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiled_decode(decode, latents, 8, 2, FACTOR, False), decode(latents))


def test_exact_when_the_decoder_sees_no_further_than_a_quarter_of_the_overlap():
    # the decoder reaches 3 pixels; overlap 6 latent cells = 12 pixels, whose quarter is 3
    decode = LocalDecoder()
    latents = torch.randn(2, 4, 30, 22, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiled = tiled_decode(decode, latents, 14, 6, FACTOR, False)
        torch.testing.assert_close(tiled, decode(latents), atol=1e-6, rtol=0)
        # less overlap than the decoder's reach: the seams show
        assert (tiled_decode(decode, latents, 14, 2, FACTOR, False) - decode(latents)).abs().max() > 1e-3


def test_vae_tiles_are_close_and_closer_as_tiles_grow():
    """A VAE decoder normalises (GroupNorm) and attends over the whole tile, so a tile sees other
    statistics than the whole image: not exact. On the random tiny VAE (untiled pixel std 0.17) the
    mean absolute difference measured 0.020, 0.012 and 0.004 for tiles of 12, 16 and 24 of 32 cells;
    a trained VAE's statistics vary less across an image."""
    decode = _vae_decode()
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = decode(latents)
        errors = [float((tiled_decode(decode, latents, tile, 4, FACTOR, False) - full).abs().mean())
                  for tile in (12, 16, 24)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] < 0.02 and errors[2] < 0.01, errors


def test_gradients_match_finite_differences_and_checkpointing_changes_nothing():
    decode = LocalDecoder(torch.float64)
    latents = torch.randn(1, 4, 10, 9, dtype=torch.float64, requires_grad=True,
                          generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda z: tiled_decode(decode, z, 6, 2, FACTOR, True), (latents,))
    vae = _vae_decode()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for use_checkpoint in (False, True):
        z = latents.clone().requires_grad_(True)
        (tiled_decode(vae, z, 8, 2, FACTOR, use_checkpoint) * weights).sum().backward()
        grads.append(z.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_tile_settings_are_checked():
    with pytest.raises(ValueError, match="vae_tile_overlap=32 must be below half of SamplerConfig.vae_tile=64"):
        SamplerConfig(vae_tile=64, vae_tile_overlap=32)
    with pytest.raises(ValueError, match="vae_tile must be >= 0"):
        SamplerConfig(vae_tile=-8)
    with pytest.raises(ValueError, match="multiples of the VAE factor 2"):
        check_sampler_fits(make_backend(torch.float32), SamplerConfig(vae_tile=9, vae_tile_overlap=2))


def test_a_tiled_run_trains():
    """The held-out reward rises with tiled decoding as it does untiled (color_target, 16 x 16
    images in nine 8-pixel tiles, neighbours 4 pixels apart); its gain is near the untiled run's."""
    sampler = SamplerConfig(steps=4, guidance_scale=3.0, truncation="uniform", k_min=2, k_max=4)
    cfg = TrainConfig(reward="color_target", steps=10, batch_size=2, lr=1e-2, width=16, height=16,
                      eval_every=10, seed=0, keep_best=False)
    prompts, held_out = ["a cat", "a dog", "a horse"], ["a fox", "a lion"]
    runs = {}
    for tile in (0, 8):
        backend = make_backend(torch.float32)
        result = train(backend, make_reward("color_target"), prompts, held_out,
                       dataclasses.replace(sampler, vae_tile=tile, vae_tile_overlap=2), LoraConfig(rank=4),
                       cfg)
        runs[tile] = result.evals[0]["eval_reward"], result.evals[-1]["eval_reward"]
    print(f"\n[tiled] held-out reward (start, end) untiled {runs[0]}, tiled {runs[8]}")
    (start0, end0), (start8, end8) = runs[0], runs[8]
    assert end8 > start8 + 0.02, runs[8]
    assert abs((end8 - start8) - (end0 - start0)) < 0.5 * (end0 - start0), runs
