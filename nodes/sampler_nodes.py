"""Sampler nodes: the differentiable sampler's settings as a socket, and a preview that samples
with exactly those settings, so users see what training sees."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from alignprop_core.config import SamplerConfig
from alignprop_core.sampling.sampler import sample_images

from .comfy_families import check_clip, check_family_inputs, family_backend
from .comfy_model import training_session
from .config_inputs import build, config_inputs

Sampler = io.Custom("ALIGNPROP_SAMPLER")
CATEGORY = "AlignProp/sampling"
SAMPLER_LIMITS = {"steps": (1, 1000, 1), "k": (1, 1000, 1), "k_min": (1, 1000, 1), "k_max": (1, 1000, 1),
                  "eta": (0.0, 1.0, 0.01), "guidance_scale": (0.0, 30.0, 0.1), "k_mean": (1.0, 1000.0, 0.1),
                  "k_std": (0.0, 1000.0, 0.1), "lv_samples": (1, 64, 1), "distilled_guidance": (0.0, 30.0, 0.1),
                  "vae_tile": (0, 8192, 8), "vae_tile_overlap": (0, 4096, 8)}
# added after the first workflows were shared: optional, so those still validate with the defaults
LATER_FIELDS = ("estimator", "lv_samples", "distilled_guidance", "vae_tile", "vae_tile_overlap")


class SamplerSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_SamplerSettings", display_name="AlignProp Sampler Settings", category=CATEGORY,
            description="the differentiable sampler: steps, eta, guidance, truncation K, gradient checkpointing, "
                        "estimator (truncated or DRaFT-LV), FLUX.1's distilled guidance and tiled VAE decoding",
            inputs=config_inputs(SamplerConfig, limits=SAMPLER_LIMITS, optional=LATER_FIELDS),
            outputs=[Sampler.Output(display_name="sampler")])

    @classmethod
    def execute(cls, **kwargs):
        return io.NodeOutput(build(SamplerConfig, kwargs))


class PreviewSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_PreviewSampler", display_name="AlignProp Preview Sampler", category=CATEGORY,
            description="samples images from a MODEL with the AlignProp sampler (no training), e.g. to see what a "
                        "reward will score",
            inputs=[io.Model.Input("model", tooltip="SD1.x, SDXL, SD3/SD3.5, FLUX.1 or Z-Image model "
                                                    "(LoRA patches apply)"),
                    io.Clip.Input("clip", tooltip="the model's text encoders"),
                    io.Vae.Input("vae", tooltip="the model's VAE"),
                    Sampler.Input("sampler", optional=True, tooltip="sampler settings (default: 20 DDIM steps)"),
                    io.String.Input("prompt", multiline=True, default="a photo of a cat", tooltip="one prompt per line"),
                    io.String.Input("negative_prompt", default="", tooltip="unconditional branch prompt"),
                    io.Int.Input("width", default=512, min=8, max=4096, step=8, tooltip="image width (multiple of 8)"),
                    io.Int.Input("height", default=512, min=8, max=4096, step=8, tooltip="image height (multiple of 8)"),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 63 - 1, tooltip="seed of the initial noise")],
            outputs=[io.Image.Output(display_name="images")])

    @classmethod
    def execute(cls, model, clip, vae, prompt, negative_prompt, width, height, seed, sampler=None):
        prompts = [p.strip() for p in prompt.splitlines() if p.strip()]
        if not prompts:
            raise ValueError("the prompt is empty; write at least one prompt (one per line).")
        cfg = sampler or SamplerConfig()
        check_family_inputs(model, vae, cfg, width, height)
        check_clip(model, clip)
        with training_session(model, vae):
            backend = family_backend(model, clip, vae, width, height)
            gen = torch.Generator().manual_seed(seed)
            x_T = torch.randn(backend.latent_shape(len(prompts), height, width), generator=gen).to(backend.device)
            with torch.no_grad():
                images = sample_images(backend, prompts, cfg, x_T, negative_prompt, 0, gen)
        return io.NodeOutput(images.permute(0, 2, 3, 1).cpu().float())  # IMAGE is (B, H, W, 3)


NODES = [SamplerSettings, PreviewSampler]
