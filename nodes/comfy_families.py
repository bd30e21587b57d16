"""Which ComfyUI MODELs the trainer and the preview sampler take, the checks made before any model
work, and the backend of each family.

SD1.x and SDXL go through `comfy_model.comfy_backend` (DDIM on eps / v), SD3/SD3.5, FLUX.1 and
Z-Image through `comfy_flow.flow_backend` (rectified-flow Euler); both read the model's own
`model_sampling` and conditioning code, so nothing here knows a family's internals beyond the
widths its text inputs must have. Those widths are what tells a CLIP that does not belong to the
MODEL (an SD1.5 CLIP on a FLUX.1 model) before it fails deep inside the first step.
"""
from __future__ import annotations

from alignprop_core.config import SamplerConfig
from alignprop_core.models.backend import DiffusionBackend, check_image_size
from alignprop_core.sampling.chain import check_flow_eta
from alignprop_core.sampling.sampler import check_model_takes

from .comfy_flow import flow_backend, patch_size_of, takes_guidance
from .comfy_model import UNET_FAMILIES, comfy_backend, model_family, vae_factor

# the loaders that give each family's text encoders, for the mismatch message
CLIP_HINTS = {
    "SD15": "the SD1.x checkpoint's CLIP (Load Checkpoint)",
    "SDXL": "the SDXL checkpoint's CLIP (Load Checkpoint)",
    "SD3": "the SD3 checkpoint's CLIP, or TripleCLIPLoader with clip_l, clip_g (and t5xxl)",
    "Flux": "DualCLIPLoader with clip_l and t5xxl, type flux",
    "FluxSchnell": "DualCLIPLoader with clip_l and t5xxl, type flux",
    "ZImage": "CLIPLoader with the Qwen3-4B text encoder, type lumina2",
}
SDXL_SIZE_EMBEDDING = 1536  # SDXL's adm input: pooled text + six 256-wide size embeddings


def text_widths(model) -> tuple[int, int | None]:
    """(context width, pooled width or None) the MODEL's diffusion model takes, from its config."""
    family = model_family(model)
    unet = model.model.model_config.unet_config
    if family == "SD15":
        return int(unet["context_dim"]), None
    if family == "SDXL":
        return int(unet["context_dim"]), int(unet["adm_in_channels"]) - SDXL_SIZE_EMBEDDING
    if family == "SD3":
        return int(unet["context_embedder_config"]["params"]["in_features"]), int(unet["adm_in_channels"])
    if family == "ZImage":
        return int(unet["cap_feat_dim"]), None
    return int(unet["context_in_dim"]), int(unet["vec_in_dim"])


def check_clip(model, clip) -> None:
    """ValueError when the CLIP's embeddings do not have the widths the MODEL takes.

    Encodes the empty prompt once (the CLIP caches nothing; the backend encodes again per prompt).
    """
    family = model_family(model)
    context_width, pooled_width = text_widths(model)
    context, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    got_pooled = None if pooled is None else int(pooled.shape[-1])
    if int(context.shape[-1]) == context_width and (pooled_width is None or got_pooled == pooled_width):
        return
    takes = f"{context_width}" + (f" (pooled {pooled_width})" if pooled_width else "")
    gives = f"{int(context.shape[-1])}" + (f" (pooled {got_pooled})" if got_pooled else "")
    raise ValueError(f"the CLIP does not belong to this {family} MODEL: it gives text embeddings of width "
                     f"{gives}, the model takes {takes}. Connect the model's own text encoders: "
                     f"{CLIP_HINTS[family]}.")


def check_family_inputs(model, vae, sampler: SamplerConfig, width: int, height: int) -> str:
    """Every check on the MODEL / VAE / sampler combination that needs no model work; the family.

    Raises:
        ValueError: an unsupported family (naming the supported ones), an image size off the
            VAE-times-patch grid, eta > 0 on a flow model, or distilled guidance on a model without
            that input.
    """
    family = model_family(model)
    flow = family not in UNET_FAMILIES
    check_image_size(width, height, vae_factor(vae), patch_size_of(model) if flow else 1)
    if flow:
        check_flow_eta(sampler.eta)
    check_model_takes(sampler, f"this {family} MODEL", flow and takes_guidance(model))
    return family


def family_backend(model, clip, vae, width: int, height: int, name: str | None = None) -> DiffusionBackend:
    """The `DiffusionBackend` of a ComfyUI MODEL of any supported family.

    Call inside `comfy_model.training_session` (grad mode on, models loaded).
    """
    family = model_family(model)
    name = name or f"comfyui-{family}"
    if family in UNET_FAMILIES:
        return comfy_backend(model, clip, vae, width, height, name=name)
    return flow_backend(model, clip, vae, width, height, name=name)
