"""FLUX.1 (dev and schnell) from a local diffusers folder, and its `DiffusionBackend`.

The folder is the layout of `FluxPipeline.save_pretrained`: a `FluxTransformer2DModel` predicting the
rectified-flow velocity, a 16-channel VAE with scaling factor and shift, a CLIP text encoder (its
pooled output) and T5 (its token sequence). The transformer takes tokens, not latent maps: every 2x2
patch of latent cells becomes one token of 4C features ("packing"), each token carries its
(0, row, column) position for the rotary embedding (`img_ids`), and the text tokens carry (0, 0, 0)
(`txt_ids`). The denoiser keeps the sampler's (B, C, h, w) latents and packs and unpacks around the
transformer, feeds the timestep as t / 1000 = sigma cast to the model's dtype, as `FluxPipeline`
does, and passes the distilled guidance (FLUX.1-dev: `guidance_embeds` in the transformer config)
from ``cond["guidance"]``. The pipeline's own sigma grid and image-size shift are
`FlowSchedule(sigma_grid="flux", patch_size=2)`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..sampling.flow_schedule import FlowSchedule
from .backend import Cond, Denoiser, DiffusionBackend
from .flow_parts import clip_pooled, decode_shifted_latents, t5_hidden
from .folders import check_layout, freeze, load_part, read_json
from .prompt_cache import DEFAULT_CAPACITY, cached_encoder, check_prompts

PIPELINE_CLASS = "FluxPipeline"
LAYOUT_HINT = ("give a local diffusers-format FLUX.1 folder (model_index.json, transformer/, vae/, "
               "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
T5_MAX_TOKENS = 512  # the pipeline's default max_sequence_length (schnell is usually run with 256)
PACK = 2  # latent cells per token side
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, FLUX.1-dev's distilled guidance

_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "tokenizer_2": ("tokenizer.json", "spiece.model"),
    "scheduler": ("scheduler_config.json",),
}


@dataclass
class FluxModel:
    """The parts of a FLUX.1 model."""

    tokenizer: CLIPTokenizer
    tokenizer_2: T5TokenizerFast
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along each side (8 for FLUX.1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latents (16 for FLUX.1): a token holds 2x2 cells of them."""
        return int(self.transformer.config.in_channels) // (PACK * PACK)

    @property
    def guidance_input(self) -> bool:
        """Whether the transformer takes distilled guidance (FLUX.1-dev) or not (schnell)."""
        return bool(self.transformer.config.guidance_embeds)


def check_flux_layout(path: Path) -> None:
    """FileNotFoundError naming what is missing, before any weight is read."""
    check_layout(path, _REQUIRED_FILES, LAYOUT_HINT)


def load_flux_model(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> FluxModel:
    """Load a frozen FLUX.1 model from a local diffusers folder, offline.

    Args:
        path: folder laid out like `FluxPipeline.save_pretrained`.
        device: device the networks are moved to.
        dtype: floating dtype of the networks' weights.

    Returns:
        A `FluxModel` whose networks are in eval mode with `requires_grad` False everywhere.

    Raises:
        FileNotFoundError: the folder, a subfolder or a config file is missing (checked first).
    """
    path = Path(path).expanduser()
    check_flux_layout(path)
    return FluxModel(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
        tokenizer_2=T5TokenizerFast.from_pretrained(path / "tokenizer_2", local_files_only=True),
        text_encoder=load_part(CLIPTextModel, path / "text_encoder", dtype, device),
        text_encoder_2=load_part(T5EncoderModel, path / "text_encoder_2", dtype, device),
        transformer=load_part(FluxTransformer2DModel, path / "transformer", dtype, device),
        vae=load_part(AutoencoderKL, path / "vae", dtype, device),
        scheduler_config=read_json(path / "scheduler" / "scheduler_config.json", LAYOUT_HINT),
    )


@torch.no_grad()
def encode_flux_prompts(model: FluxModel, prompts: list[str],
                        max_sequence_length: int = T5_MAX_TOKENS) -> Cond:
    """FLUX.1 conditioning of `prompts`, as `FluxPipeline.encode_prompt` computes it.

    Args:
        model: the model whose tokenizers and text encoders are used.
        prompts: one string per batch element.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 512).

    Returns:
        {"context": (B, max_sequence_length, d_T5) T5's last hidden state,
         "pooled": (B, d_CLIP) CLIP's pooled output}, in the text encoders' dtypes, on the
        transformer's device.
    """
    prompts = check_prompts(prompts)
    device = model.transformer.device
    pooled = clip_pooled(model.tokenizer, model.text_encoder, prompts, model.tokenizer.model_max_length)
    context = t5_hidden(model.tokenizer_2, model.text_encoder_2, prompts, max_sequence_length)
    return {"context": context.to(device), "pooled": pooled.to(device)}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens, each the 2x2 patch (c, dy, dx) flattened,
    row-major over patches: FLUX's token layout."""
    b, c, h, w = latents.shape
    if h % PACK or w % PACK:
        raise ValueError(f"latents of {h}x{w} cells do not split into {PACK}x{PACK} patches; give an "
                         f"image size that is a multiple of the VAE factor times {PACK}.")
    patches = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, features = tokens.shape
    c = features // (PACK * PACK)
    patches = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) token positions (0, row, column) of packed latents of h x w cells."""
    rows = torch.arange(h // PACK, device=device).repeat_interleave(w // PACK)
    cols = torch.arange(w // PACK, device=device).repeat(h // PACK)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def flux_denoiser(transformer: FluxTransformer2DModel) -> Denoiser:
    """Wrap a FluxTransformer2DModel as a `Denoiser`: (x_t (B, C, h, w), t = 1000 sigma, cond) ->
    velocity (B, C, h, w). `cond` holds "context" (T5), "pooled" (CLIP) and, for a model with
    `guidance_embeds`, "guidance" (B,)."""
    takes_guidance = bool(transformer.config.guidance_embeds)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = transformer.dtype
        h, w = x_t.shape[-2:]
        context = cond["context"].to(dtype)
        guidance = None
        if takes_guidance:
            if "guidance" not in cond:
                raise ValueError("this FLUX.1 transformer takes distilled guidance (guidance_embeds) "
                                 "but the conditioning has no 'guidance' entry; sample through "
                                 "sampling.sampler.sample_images, which adds it.")
            guidance = cond["guidance"].float()
        out = transformer(
            hidden_states=pack_latents(x_t.to(dtype)),
            # the pipeline casts t to the latents' dtype before dividing, so bf16 rounds it alike
            timestep=t.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=context.device, dtype=dtype),
            img_ids=image_ids(h, w, x_t.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    return denoise


def flux_schedule(model: FluxModel) -> FlowSchedule:
    """The pipeline's noise levels: the scheduler config with FluxPipeline's own grid
    linspace(1, 1/n, n) and the dynamic shift counted in 2x2-patch tokens."""
    return replace(FlowSchedule.from_config(model.scheduler_config), sigma_grid="flux", patch_size=PACK)


def flux_backend(model: FluxModel, name: str = "flux", max_sequence_length: int = T5_MAX_TOKENS,
                 cache_capacity: int = DEFAULT_CAPACITY) -> DiffusionBackend:
    """A `DiffusionBackend` over a loaded FLUX.1 model.

    Args:
        model: the loaded model (frozen).
        name: recorded in LoRA metadata.
        max_sequence_length: T5 tokens per prompt.
        cache_capacity: distinct prompts whose conditioning is kept (see `prompt_cache`).
    """
    freeze(model.text_encoder, model.text_encoder_2, model.vae)

    def encode_batch(prompts: list[str]) -> Cond:
        return encode_flux_prompts(model, prompts, max_sequence_length)

    return DiffusionBackend(
        denoiser=flux_denoiser(model.transformer),
        schedule=flux_schedule(model),
        encode_prompts=cached_encoder(encode_batch, cache_capacity),
        decode=lambda latents: decode_shifted_latents(model.vae, latents),
        latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        lora_target=model.transformer,
        device=model.transformer.device,
        name=name,
        arch="flux",
        patch_size=PACK,
        guidance_input=model.guidance_input,
        default_guidance=DEFAULT_GUIDANCE if model.guidance_input else None,
    )
