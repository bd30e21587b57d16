"""Tiny, randomly initialised models of the real SD1.x architecture family, for the unit tests.

No weights are ever downloaded: every model here is built from a config with a fixed seed.
(A plain module, not conftest.py: tests/comfyui has a conftest of its own, and `from conftest
import ...` would pick whichever was imported first.)
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alignprop_core.models.backend import DiffusionBackend, unet_denoiser  # noqa: E402
from alignprop_core.sampling.schedule import NoiseSchedule  # noqa: E402

SD15_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
}
CONTEXT_DIM = 32


def make_unet(dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=8, attention_head_dim=8)
    return unet.to(dtype).eval().requires_grad_(False)


def make_vae(dtype: torch.dtype = torch.float32, seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=8, sample_size=16)
    return vae.to(dtype).eval().requires_grad_(False)


def fake_text_encoder(dtype: torch.dtype):
    """Prompt -> a fixed random (4, CONTEXT_DIM) embedding, seeded by the prompt text."""

    def encode(prompts):
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.randn(4, CONTEXT_DIM, generator=g, dtype=torch.float64))
        return {"context": torch.stack(rows).to(dtype)}

    return encode


def make_backend(dtype: torch.dtype = torch.float32, unet=None, vae=None,
                 scheduler: dict | None = None) -> DiffusionBackend:
    unet = unet if unet is not None else make_unet(dtype)
    vae = vae if vae is not None else make_vae(dtype)

    def decode(latents):
        img = vae.decode(latents.to(vae.dtype) / 0.18215).sample
        return (img / 2 + 0.5).clamp(0, 1)

    return DiffusionBackend(
        denoiser=unet_denoiser(unet),
        schedule=NoiseSchedule.from_diffusers_config(scheduler or SD15_SCHEDULER),
        encode_prompts=fake_text_encoder(dtype), decode=decode, latent_channels=4,
        vae_scale_factor=2, lora_target=unet, device=torch.device("cpu"), name="tiny-test")
