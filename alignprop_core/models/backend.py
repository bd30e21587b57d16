"""The host adapter: everything the sampler and trainer need from a diffusion model, as callables.

A `DiffusionBackend` bundles "predict the model output for x_t at timestep t with this
conditioning" (the denoiser), the noise schedule, prompt encoding, latent decoding and the module that
receives the LoRA. The sampler, the trainer and the rewards only ever see this bundle, so a diffusers
pipeline (here) and a ComfyUI MODEL (in `nodes/`) each need one small adapter and nothing else.

Conditioning is a dict of batch-first tensors (e.g. ``{"context": (B, L, D)}``; SDXL adds pooled text
and size embeddings), so classifier-free guidance can batch the two branches by concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from ..sampling.flow_schedule import FlowSchedule
from ..sampling.schedule import NoiseSchedule

Cond = dict[str, torch.Tensor]


class Denoiser(Protocol):
    """The model's native output for x_t at timesteps t.

    With a `NoiseSchedule` (DDIM; SD1.x, SDXL) t is the integer timestep (long) and the output is
    epsilon, v or x0 as the schedule says; with a `FlowSchedule` (rectified flow; SD3, FLUX.1) t is
    the float timestep num_train_timesteps * sigma and the output is the velocity e - x0. Latents
    are always (B, C, h, w); a model that takes tokens packs and unpacks them itself. A model with a
    distilled-guidance input reads it from ``cond["guidance"]`` (B,).
    """

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


@dataclass
class DiffusionBackend:
    """A text-to-image model seen through the callables AlignProp needs."""

    denoiser: Denoiser  # (x_t (B,C,h,w), t (B,) long, cond) -> model output (B,C,h,w)
    schedule: NoiseSchedule | FlowSchedule  # noise levels and the update between them
    encode_prompts: Callable[[Sequence[str]], Cond]  # prompts -> conditioning, frozen
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> images (B,3,H,W) in [0,1], differentiable
    latent_channels: int  # C of the latent space
    vae_scale_factor: int  # image size / latent size
    lora_target: nn.Module  # the module LoRA is injected into (the UNet)
    device: torch.device  # where latents are created
    name: str = "model"  # recorded in LoRA metadata
    arch: str | None = None  # "sd15" | "sdxl" | "sd3" | "flux": picks the LoRA file's key naming
    patch_size: int = 1  # latent cells per model token side; image sides are multiples of f * patch
    guidance_input: bool = False  # the model takes distilled guidance as an input (FLUX.1-dev)
    default_guidance: float | None = None  # that input's value when the sampler config gives none

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of x_T for images of height x width; errors if the VAE factor does not divide them."""
        f = self.vae_scale_factor
        check_image_size(width, height, f, self.patch_size)
        return (batch, self.latent_channels, height // f, width // f)


def check_image_size(width: int, height: int, vae_factor: int, patch_size: int = 1) -> None:
    """ValueError unless the VAE factor times the model's patch size divides both sides (hosts
    check this before loading a model)."""
    multiple = vae_factor * patch_size
    if height % multiple or width % multiple:
        what = (f"the VAE factor {vae_factor}" if patch_size == 1 else
                f"{multiple} (the VAE factor {vae_factor} times the patch size {patch_size})")
        raise ValueError(f"width={width} and height={height} must be multiples of {what}; "
                         f"round them to a multiple of {multiple}.")


def unet_denoiser(unet: nn.Module) -> Denoiser:
    """Wrap a diffusers UNet2DConditionModel as a `Denoiser`.

    Latents stay in the caller's dtype between steps; the UNet sees its own dtype, so an fp16 UNet
    works with fp32 latents and the DDIM arithmetic stays in fp32.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = unet.dtype
        extra = {k: v.to(dtype) for k, v in cond.items() if k not in ("context",)}
        out = unet(x_t.to(dtype), t, encoder_hidden_states=cond["context"].to(dtype),
                   added_cond_kwargs=extra or None, return_dict=False)[0]
        return out.to(x_t.dtype)

    return denoise


def diffusers_backend(model, name: str = "model") -> DiffusionBackend:
    """A backend over a `T2IModel` (a diffusers-format SD1.x-style pipeline loaded from disk)."""
    from .t2i_model import decode_latents, encode_prompts

    def encode(prompts: Sequence[str]) -> Cond:
        return {"context": encode_prompts(model, list(prompts))}

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(model, latents.to(model.vae.dtype)).float()

    return DiffusionBackend(
        denoiser=unet_denoiser(model.unet),
        schedule=NoiseSchedule.from_diffusers_config(model.scheduler_config),
        encode_prompts=encode,
        decode=decode,
        latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        lora_target=model.unet,
        device=model.unet.device,
        name=name,
        arch=diffusers_arch(model.unet.config),
    )


def diffusers_arch(unet_config) -> str:
    """'sdxl' for a UNet with SDXL's text-time embedding, else 'sd15' (the SD1.x layout family)."""
    return "sdxl" if getattr(unet_config, "addition_embed_type", None) == "text_time" else "sd15"
