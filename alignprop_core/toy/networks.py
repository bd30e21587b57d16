"""The architecture of the toy-world text-to-image model: SD1.x classes at toy widths.

Tokenizer (CLIP BPE over the toy vocabulary, built locally), CLIPTextModel, UNet2DConditionModel
and AutoencoderKL (factor-2 downsampling, 4 latent channels): 32 x 32 images, 4 x 16 x 16 latents.
Only the shapes live here; `pretrain.py` trains the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignprop_core.models.tiny_model import TINY_SCHEDULER_CONFIG, MAX_TOKENS, build_tiny_tokenizer

from .shapes import VOCABULARY

# SD1.x's DDPM schedule (scaled_linear 0.00085..0.012 over 1000 steps), sampled with DDIM
SCHEDULER_CONFIG = dict(TINY_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class ToyArchitecture:
    """Widths of the three networks (the defaults are the committed model's)."""

    text_width: int = 64  # CLIP hidden size = UNet cross-attention dim
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 96)  # attention only below full latent size
    unet_head_dim: int = 8
    vae_channels: tuple[int, ...] = (16, 32)  # two blocks: 2x downsampling
    latent_channels: int = 4
    image_size: int = 32


def build_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer whose whole-word tokens are the toy vocabulary (no download)."""
    return build_tiny_tokenizer(list(VOCABULARY))


def build_text_encoder(arch: ToyArchitecture, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        projection_dim=arch.text_width, num_hidden_layers=arch.text_layers, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_unet(arch: ToyArchitecture) -> UNet2DConditionModel:
    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.image_size // 2 ** (len(arch.vae_channels) - 1),
        in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels, layers_per_block=1,
        # self/cross-attention at 16 x 16 would cost 2.5x the time of the whole UNet on the CPU;
        # the lower levels (8 x 8, 4 x 4 and the middle) carry the text conditioning
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=arch.text_width, attention_head_dim=arch.unet_head_dim, norm_num_groups=8)


def build_vae(arch: ToyArchitecture, scaling_factor: float = 1.0) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
        block_out_channels=arch.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8,
        sample_size=arch.image_size, scaling_factor=scaling_factor, mid_block_add_attention=False)
