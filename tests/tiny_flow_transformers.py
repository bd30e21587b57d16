"""Tiny, randomly initialised SD3 and FLUX.1 transformers (the real diffusers classes), for unit tests.

Both have two layers and a head dimension of 8. The SD3 one has SD3.5's extras (a dual-attention
first block with ``attn2``, RMS q/k norms) and, like every SD3 model, a last block that only
updates the image stream (no ``to_add_out``/``ff_context``). The FLUX one has one double and one
single block and the distilled-guidance embedder of FLUX.1-dev. No weights are ever downloaded.
"""
from __future__ import annotations

import torch

SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                  caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
                  dual_attention_layers=(0,), qk_norm="rms_norm")
FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                   guidance_embeds=True, axes_dims_rope=(2, 2, 4))
TEXT_TOKENS = 3


def make_sd3(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """An ``SD3Transformer2DModel`` of ``SD3_CONFIG`` (with ``overrides``), eval mode and frozen."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**{**SD3_CONFIG, **overrides})
    model = model if dtype == torch.float32 else model.to(dtype)
    return model.eval().requires_grad_(False)


def make_flux(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A ``FluxTransformer2DModel`` of ``FLUX_CONFIG`` (with ``overrides``), eval mode and frozen."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**{**FLUX_CONFIG, **overrides})
    model = model if dtype == torch.float32 else model.to(dtype)
    return model.eval().requires_grad_(False)


def sd3_inputs(model, batch: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    """Keyword inputs of one SD3 forward call: (B, C, 8, 8) latents, text tokens, pooled text, t."""
    cfg, dtype = model.config, model.dtype
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim,
                                                 generator=g).to(dtype),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
            "timestep": torch.tensor([250.0, 800.0][:batch] + [500.0] * max(batch - 2, 0), dtype=dtype)}


def flux_inputs(model, batch: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    """Keyword inputs of one FLUX forward call: 16 packed latent tokens (a 4x4 grid), text tokens,
    pooled text, t in [0, 1], position ids and (with a guidance embedder) the guidance scale."""
    cfg, dtype = model.config, model.dtype
    g = torch.Generator().manual_seed(seed)
    side = 4
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)
    inputs = {"hidden_states": torch.randn(batch, side * side, cfg.in_channels, generator=g).to(dtype),
              "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim,
                                                   generator=g).to(dtype),
              "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
              "timestep": torch.linspace(0.25, 0.8, batch, dtype=dtype),
              "img_ids": img_ids, "txt_ids": torch.zeros(TEXT_TOKENS, 3, dtype=dtype)}
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return inputs


def run_transformer(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output for ``inputs`` (no gradient)."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
