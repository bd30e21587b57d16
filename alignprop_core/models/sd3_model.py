"""Stable Diffusion 3 / 3.5 from a local diffusers folder, and its `DiffusionBackend`.

The folder is the layout of `StableDiffusion3Pipeline.save_pretrained`: an MMDiT
(`SD3Transformer2DModel`) predicting the rectified-flow velocity, a 16-channel VAE whose latents are
normalised with a scaling factor and a shift, two CLIP text encoders with projection (CLIP-L, CLIP-G)
and an optional T5 encoder. Prompts are encoded as the pipeline's `encode_prompt` does (Esser et
al. 2024, "Scaling Rectified Flow Transformers"): the two CLIPs' penultimate hidden states
concatenated along features, zero-padded to T5's width and followed by T5's tokens along the
sequence; the pooled vector is the two projected CLIP outputs side by side. A folder without T5
(`text_encoder_3: [null, null]` in model_index.json) gets zeros in T5's place, as diffusers gives.
The denoiser takes t = 1000 sigma as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..sampling.flow_schedule import FlowSchedule
from .backend import Cond, Denoiser, DiffusionBackend
from .flow_parts import clip_penultimate_and_projection, decode_shifted_latents, t5_hidden
from .folders import check_layout, freeze, load_part, read_json
from .prompt_cache import DEFAULT_CAPACITY, cached_encoder, check_prompts

PIPELINE_CLASS = "StableDiffusion3Pipeline"
LAYOUT_HINT = ("give a local diffusers-format SD3/SD3.5 folder (model_index.json, transformer/, vae/, "
               "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, and "
               "text_encoder_3/ and tokenizer_3/ unless model_index.json sets text_encoder_3 to "
               "[null, null])")
T5_MAX_TOKENS = 256  # the pipeline's default max_sequence_length

_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "tokenizer_2": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
_T5_FILES: dict[str, tuple[str, ...]] = {
    "text_encoder_3": ("config.json",),
    "tokenizer_3": ("tokenizer.json", "spiece.model"),
}


@dataclass
class SD3Model:
    """The parts of an SD3/SD3.5 model; the T5 pair is None in a folder saved without T5."""

    tokenizer: CLIPTokenizer  # CLIP-L; its model_max_length is both CLIPs' prompt length
    tokenizer_2: CLIPTokenizer  # CLIP-G
    tokenizer_3: T5TokenizerFast | None
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel | None
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along each side (8 for SD3)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the transformer denoises (16 for SD3)."""
        return int(self.transformer.config.in_channels)


def uses_t5(model_index: dict[str, Any]) -> bool:
    """Whether an SD3 model_index.json names a T5 text encoder (diffusers writes [null, null] for a
    pipeline saved with text_encoder_3=None)."""
    entry = model_index.get("text_encoder_3")
    return isinstance(entry, (list, tuple)) and any(part is not None for part in entry)


def check_sd3_layout(path: Path) -> bool:
    """FileNotFoundError naming what is missing; returns whether the folder has T5."""
    check_layout(path, _REQUIRED_FILES, LAYOUT_HINT)
    with_t5 = uses_t5(read_json(path / "model_index.json", LAYOUT_HINT))
    if with_t5:
        check_layout(path, _T5_FILES, LAYOUT_HINT)
    return with_t5


def load_sd3_model(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> SD3Model:
    """Load a frozen SD3/SD3.5 model from a local diffusers folder, offline.

    Args:
        path: folder laid out like `StableDiffusion3Pipeline.save_pretrained`.
        device: device the networks are moved to.
        dtype: floating dtype of the networks' weights.

    Returns:
        An `SD3Model` whose networks are in eval mode with `requires_grad` False everywhere.

    Raises:
        FileNotFoundError: the folder, a subfolder or a config file is missing (checked first).
    """
    path = Path(path).expanduser()
    with_t5 = check_sd3_layout(path)
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = T5TokenizerFast.from_pretrained(path / "tokenizer_3", local_files_only=True)
        text_encoder_3 = load_part(T5EncoderModel, path / "text_encoder_3", dtype, device)
    return SD3Model(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True),
        tokenizer_3=tokenizer_3,
        text_encoder=load_part(CLIPTextModelWithProjection, path / "text_encoder", dtype, device),
        text_encoder_2=load_part(CLIPTextModelWithProjection, path / "text_encoder_2", dtype, device),
        text_encoder_3=text_encoder_3,
        transformer=load_part(SD3Transformer2DModel, path / "transformer", dtype, device),
        vae=load_part(AutoencoderKL, path / "vae", dtype, device),
        scheduler_config=read_json(path / "scheduler" / "scheduler_config.json", LAYOUT_HINT),
    )


@torch.no_grad()
def encode_sd3_prompts(model: SD3Model, prompts: list[str],
                       max_sequence_length: int = T5_MAX_TOKENS) -> Cond:
    """SD3 conditioning of `prompts`, as `StableDiffusion3Pipeline.encode_prompt` computes it.

    Args:
        model: the model whose tokenizers and text encoders are used.
        prompts: one string per batch element.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).

    Returns:
        {"context": (B, L_clip + max_sequence_length, joint_attention_dim),
         "pooled": (B, P_clip_l + P_clip_g)}, in the text encoders' dtype.
    """
    prompts = check_prompts(prompts)
    clip_length = model.tokenizer.model_max_length
    hidden_l, pooled_l = clip_penultimate_and_projection(model.tokenizer, model.text_encoder, prompts,
                                                         clip_length)
    hidden_g, pooled_g = clip_penultimate_and_projection(model.tokenizer_2, model.text_encoder_2, prompts,
                                                         clip_length)
    clip = torch.cat([hidden_l, hidden_g], dim=-1)
    dtype, device = model.text_encoder.dtype, model.text_encoder.device
    if model.text_encoder_3 is None:
        t5 = torch.zeros(len(prompts), max_sequence_length, model.transformer.config.joint_attention_dim,
                         device=device, dtype=dtype)
    else:
        t5 = t5_hidden(model.tokenizer_3, model.text_encoder_3, prompts, max_sequence_length)
    # CLIP's features are zero-padded to T5's width so the two sequences can be concatenated
    clip = F.pad(clip.to(dtype=dtype, device=device), (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5.to(dtype=dtype, device=device)], dim=-2)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1).to(dtype=dtype, device=device)
    return {"context": context, "pooled": pooled}


def sd3_denoiser(transformer: SD3Transformer2DModel) -> Denoiser:
    """Wrap an SD3Transformer2DModel as a `Denoiser`: (x_t, t = 1000 sigma, cond) -> velocity.

    The transformer sees its own dtype; the velocity comes back in x_t's dtype, so bf16 weights work
    with float32 latents and the Euler arithmetic stays in float32.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = transformer.dtype
        out = transformer(hidden_states=x_t.to(dtype), timestep=t,
                          encoder_hidden_states=cond["context"].to(dtype),
                          pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]
        return out.to(x_t.dtype)

    return denoise


def sd3_schedule(model: SD3Model) -> FlowSchedule:
    """The pipeline's noise levels: the scheduler config on diffusers' default grid, with tokens
    counted by the transformer's patch size (only read when the config shifts dynamically)."""
    schedule = FlowSchedule.from_config(model.scheduler_config)
    return replace(schedule, sigma_grid="default", patch_size=int(model.transformer.config.patch_size))


def sd3_backend(model: SD3Model, name: str = "sd3", max_sequence_length: int = T5_MAX_TOKENS,
                cache_capacity: int = DEFAULT_CAPACITY) -> DiffusionBackend:
    """A `DiffusionBackend` over a loaded SD3/SD3.5 model.

    Args:
        model: the loaded model (frozen).
        name: recorded in LoRA metadata.
        max_sequence_length: T5 tokens per prompt.
        cache_capacity: distinct prompts whose conditioning is kept (see `prompt_cache`).
    """
    freeze(model.text_encoder, model.text_encoder_2, model.text_encoder_3, model.vae)

    def encode_batch(prompts: list[str]) -> Cond:
        return encode_sd3_prompts(model, prompts, max_sequence_length)

    return DiffusionBackend(
        denoiser=sd3_denoiser(model.transformer),
        schedule=sd3_schedule(model),
        encode_prompts=cached_encoder(encode_batch, cache_capacity),
        decode=lambda latents: decode_shifted_latents(model.vae, latents),
        latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        lora_target=model.transformer,
        device=model.transformer.device,
        name=name,
        arch="sd3",
        patch_size=int(model.transformer.config.patch_size),
    )
