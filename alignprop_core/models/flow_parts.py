"""What the SD3/SD3.5 and FLUX.1 backends share: their text encoders' outputs, computed the way
diffusers' pipelines compute them, and the VAE decode with a scaling factor and a shift.

Both pipelines pad every prompt to a fixed token count with the tokenizer's own pad token and pass
no attention mask, so an embedding depends only on its prompt and batches of prompts concatenate.
SD3 conditions on CLIP's penultimate hidden layer plus its projected pooled output; FLUX.1 takes
CLIP's pooled output (no projection) and T5's last hidden state.
"""
from __future__ import annotations

import torch
from torch import nn


def _token_ids(tokenizer, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def clip_penultimate_and_projection(tokenizer, encoder: nn.Module, prompts: list[str],
                                    max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP conditioning from a CLIPTextModelWithProjection.

    Returns:
        (hidden (B, max_length, D) of the penultimate layer, text_embeds (B, P) the projected
        pooled output), in the encoder's dtype.
    """
    out = encoder(_token_ids(tokenizer, prompts, max_length, encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def clip_pooled(tokenizer, encoder: nn.Module, prompts: list[str], max_length: int) -> torch.Tensor:
    """FLUX.1's pooled CLIP vector (B, D) from a CLIPTextModel (the end-of-text token's final state)."""
    out = encoder(_token_ids(tokenizer, prompts, max_length, encoder.device))
    return out.pooler_output


def t5_hidden(tokenizer, encoder: nn.Module, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5 encoder's last hidden state (B, max_length, d_model)."""
    return encoder(_token_ids(tokenizer, prompts, max_length, encoder.device))[0]


def decode_shifted_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the denoiser's scale -> images (B, 3, H, W) in [0, 1], keeping the autograd graph.

    The SD3 and FLUX VAEs normalise latents as (z - shift) * scale, so decoding inverts that:
    z = latents / scaling_factor + shift_factor. Images come back in float32 or wider (a float64
    VAE stays float64, so finite-difference checks keep their precision).
    """
    shift = vae.config.shift_factor or 0.0
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    images = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    return images.to(torch.promote_types(images.dtype, torch.float32))
