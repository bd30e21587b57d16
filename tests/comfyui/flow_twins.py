"""Tiny SD3 and FLUX.1 transformers as diffusers models and as real ComfyUI MODELs on the same weights.

The test process builds the diffusers side (``FAMILIES``: each family's maker from
``tiny_flow_transformers``, resized to what ComfyUI's detection assumes) and saves its weights; a
ComfyUI subprocess (inproc.py) turns those weights into a MODEL with `comfy_flow_model`, as ComfyUI's
diffusion-model loader does.
"""
from __future__ import annotations

import json

from tiny_flow_transformers import flux_inputs, make_flux, make_sd3, sd3_inputs

# Per family: the diffusers model, its sizes, and the ComfyUI config entries detection cannot infer.
# ComfyUI's MMDiT takes its depth (and head count) as width / 64, so the SD3 model is 2 blocks of
# 2 heads of 64; ComfyUI's Flux packs 2x2 patches of 16 channels, so the FLUX model takes 64 inputs.
FAMILIES = {
    "sd3": dict(make=make_sd3, inputs=sd3_inputs, comfy_config={},
                sizes=dict(in_channels=16, out_channels=16, attention_head_dim=64, num_attention_heads=2,
                           caption_projection_dim=128)),
    "flux": dict(make=make_flux, inputs=flux_inputs, comfy_config={"num_heads": 2, "axes_dim": [2, 2, 4]},
                 sizes=dict(in_channels=64)),
}


def comfy_flow_model(weights_path: str, extra_config: str | dict, weight_dtype: str | None = None):
    """A CPU ComfyUI ModelPatcher over diffusers-named transformer weights (in a ComfyUI process):
    ``convert_diffusers_mmdit``, ``detect_unet_config`` plus the entries it cannot read
    (``extra_config``, a dict or its JSON), then the weights loaded strictly.

    ``weight_dtype`` None keeps float32; "fp8_e4m3fn" stores the weights in float8 and computes in
    ComfyUI's manual-cast dtype, as Load Diffusion Model's weight_dtype option does
    (``comfy.sd.load_diffusion_model_state_dict`` with ``dtype``)."""
    import torch
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils

    extra = json.loads(extra_config) if isinstance(extra_config, str) else extra_config
    sd = comfy.model_detection.convert_diffusers_mmdit(comfy.utils.load_torch_file(weights_path), "")
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    unet_config.update(extra)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if weight_dtype is None:
        model_config.set_inference_dtype(torch.float32, None)
    else:
        import comfy.model_management as mm

        dtype = getattr(torch, {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}[weight_dtype])
        model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, torch.device("cpu"),
                                                                    model_config.supported_inference_dtypes))
    model = model_config.get_model(sd, "")
    model.diffusion_model.load_state_dict(sd, strict=True)  # the sizes match the diffusers model's
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_flow_vae(seed: int = 0):
    """ComfyUI's own 16-channel VAE (SD3 / FLUX.1 latents) with random weights (in a ComfyUI process).

    ``comfy.sd.VAE`` builds the full-size decoder from a fixed config whatever the weights, so the
    weights are those of an ``AutoencodingEngine`` of that config. ComfyUI's layers skip their own
    initialisation (``torch.empty``), so every weight is drawn here: normal(0, 1/fan_in) for
    convolutions and linear layers, ones and zeros for norms and biases.
    """
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.sd.VAE(sd=engine.state_dict())


class StandInClip:
    """tokenize / encode_from_tokens of a CLIP that returns fixed random embeddings per prompt:
    (1, 4, dim) context and (1, pooled_dim) pooled text. Stands in for text encoders too large to
    build in a test (T5-XXL), where only the widths matter."""

    def __init__(self, dim: int, pooled_dim: int):
        self.dim, self.pooled_dim = dim, pooled_dim

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        import torch

        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        return torch.randn(1, 4, self.dim, generator=g), torch.randn(1, self.pooled_dim, generator=g)


# A Z-Image-like NextDiT of ComfyUI's own class (ZImage model config, Lumina2 model): the family's
# switches (z_image_modulation, time_scale, RMS q/k norm, caption padding to multiples of 32) at
# width 256 (its timestep embedding is 256 wide). ComfyUI's detection fixes Z-Image's width at 3840,
# so the config is given, not detected.
ZIMAGE_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
                 "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                 "axes_dims": [32, 48, 48], "axes_lens": [256, 64, 64], "rope_theta": 256.0,
                 "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 32, "z_image_modulation": True,
                 "time_scale": 1000.0, "pad_tokens_multiple": 32}


def comfy_zimage_model(seed: int = 0):
    """A float32 CPU ComfyUI ModelPatcher of ``ZIMAGE_CONFIG`` with random weights (in a ComfyUI
    process). ComfyUI's layers skip their initialisation, so every weight is drawn here:
    normal(0, 1/fan_in) for matrices, ones for 1-D weights (norm scales), small normal for biases
    and pad tokens."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.ZImage(dict(ZIMAGE_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim > 1 and "pad_token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# ComfyUI's Qwen3 text encoder of Z-Image at a small size (its config is a dataclass of Qwen3-4B's
# sizes; these fields override them); hidden_size is the caption width ZIMAGE_CONFIG takes
TINY_QWEN3 = {"hidden_size": ZIMAGE_CONFIG["cap_feat_dim"], "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 2, "num_key_value_heads": 1}


def comfy_zimage_clip(seed: int = 0):
    """ComfyUI's Z-Image CLIP (ZImageTokenizer with its chat template, ``z_image.te`` with its
    hidden-layer output) whose Qwen3 model is ``TINY_QWEN3`` with random weights (in a ComfyUI
    process). The class is swapped through ComfyUI's own ``model_options["qwen3_4b_class"]``."""
    import torch
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.llama
    import comfy.text_encoders.z_image as z_image

    class TinyQwen3(z_image.Qwen3_4BModel):
        def __init__(self, device="cpu", layer="hidden", layer_idx=-2, dtype=None, attention_mask=True,
                     model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(TINY_QWEN3),
                dtype=dtype, special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                model_class=comfy.text_encoders.llama.Qwen3_4B, enable_attention_masks=attention_mask,
                return_attention_masks=attention_mask, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te())
    clip = comfy.sd.CLIP(target=target, model_options={"qwen3_4b_class": TinyQwen3,
                                                       "dtype": torch.float32})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in clip.cond_stage_model.state_dict().items():
        if p.ndim > 1:
            state[name] = torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5)
        else:
            state[name] = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
    clip.cond_stage_model.load_state_dict(state, strict=True)
    return clip
