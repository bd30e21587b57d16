"""The ComfyUI MODEL / CLIP / VAE adapter: the only file that knows ComfyUI's model internals.

It turns what CheckpointLoaderSimple returns into an `alignprop_core.models.backend.DiffusionBackend`:
- denoiser: the LDM UNet (`model.model.diffusion_model`) called with variance-preserving x_t and the
  integer timestep, exactly what ComfyUI's EPS / V_PREDICTION wrappers feed it after scaling;
- schedule: alphas_cumprod = 1 / (1 + sigma^2) from the model's own `model_sampling` sigmas, with
  the SD1.x/SDXL DDIM timestep rule (leading spacing, offset 1);
- prompts: CLIP.tokenize + encode_from_tokens (SDXL adds the pooled text and size embedding `y`);
  contexts of different token lengths (long prompts) are batched by the core's `conditioning`;
- decode: the VAE's `first_stage_model.decode` called directly, because `VAE.decode` runs without grad.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from alignprop_core.sampling.conditioning import concat_token_sequences
from alignprop_core.models.backend import Cond, DiffusionBackend
from alignprop_core.sampling.schedule import NoiseSchedule

# ComfyUI's model config classes (comfy.supported_models) the trainer takes, by exact class, so
# variants that take other inputs (inpainting, refiners, Flux2, Chroma) are refused
FAMILIES = ("SD15", "SDXL", "SD3", "Flux", "FluxSchnell", "ZImage")
UNET_FAMILIES = ("SD15", "SDXL")  # sampled by DDIM on eps / v; the others are rectified flows
SUPPORTED = "SD1.x (SD15), SDXL, SD3/SD3.5 (SD3), FLUX.1 dev/schnell (Flux, FluxSchnell) and Z-Image (ZImage)"


def model_family(model) -> str:
    """The model config class name (one of FAMILIES) of a ComfyUI ModelPatcher; ValueError naming
    the supported families otherwise."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    found = type(config).__name__ if config is not None else type(model).__name__
    if found in FAMILIES:
        return found
    raise ValueError(f"AlignProp trains {SUPPORTED} models; this MODEL is {found}. Load one of those "
                     "with Load Checkpoint or Load Diffusion Model (video, audio, upscaler, inpainting and "
                     "edit models cannot be trained toward an image reward here).")


def noise_schedule(model) -> NoiseSchedule:
    """The model's DDPM schedule, from ComfyUI's model_sampling (discrete EPS or V_PREDICTION)."""
    import comfy.model_sampling as ms_lib

    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms_lib.ModelSamplingDiscrete) or isinstance(sampling, ms_lib.EDM):
        raise ValueError(f"model sampling {type(sampling).__name__} is not a discrete DDPM schedule; "
                         "AlignProp's DDIM sampler needs an SD1.x/SDXL eps or v-prediction model.")
    prediction = "v_prediction" if isinstance(sampling, ms_lib.V_PREDICTION) else "epsilon"
    sigmas = sampling.sigmas.detach().to("cpu", torch.float64)
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
    return NoiseSchedule(alphas_cumprod=alphas_cumprod, prediction_type=prediction,
                         timestep_spacing="leading", steps_offset=1,
                         final_alpha_cumprod=float(alphas_cumprod[0]))


def prompt_encoder(model, clip, family: str, width: int, height: int):
    """prompts -> {"context": (B, L, D)} (+ "y": (B, 2816) for SDXL), cached per prompt."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def encode_one(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if text not in cache:
            tokens = clip.tokenize(text)
            context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            y = None
            if family == "SDXL":
                y = model.model.encode_adm(pooled_output=pooled, width=width, height=height,
                                           crop_w=0, crop_h=0, target_width=width, target_height=height)
            cache[text] = (context.detach().clone(), None if y is None else y.detach().clone())
        return cache[text]

    def encode(prompts: Sequence[str]) -> Cond:
        pairs = [encode_one(p) for p in prompts]
        # long prompts have more tokens: repeated to a common length, as ComfyUI's CONDCrossAttn does
        cond = {"context": concat_token_sequences([c for c, _ in pairs], "context")}
        if family == "SDXL":
            cond["y"] = torch.cat([y for _, y in pairs])
        return cond

    return encode


def unet_denoiser(diffusion_model):
    """ComfyUI's LDM UNet as a `Denoiser`: VP-space x_t and integer timesteps in, eps or v out."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = diffusion_model.dtype
        extra = {"y": cond["y"].to(x_t.device, dtype)} if "y" in cond else {}
        out = diffusion_model(x_t.to(dtype), t.float(), context=cond["context"].to(x_t.device, dtype),
                              transformer_options={}, **extra)
        return out.to(x_t.dtype)

    return denoise


def vae_decoder(model, vae):
    """Model-space latents -> images (B, 3, H, W) in [0, 1], differentiable."""
    first_stage = vae.first_stage_model

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = model.model.process_latent_out(latents)
        dtype = next(first_stage.parameters()).dtype
        images = first_stage.decode(z.to(dtype))
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    return decode


def _make_trainable_copyable(module: torch.nn.Module) -> None:
    """Tensors created under inference_mode cannot take part in autograd; give them normal storage.

    Values are unchanged, so other users of this shared module see the same weights.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def comfy_backend(model, clip, vae, width: int, height: int, name: str = "comfyui-model") -> DiffusionBackend:
    """A `DiffusionBackend` over a ComfyUI MODEL (ModelPatcher), CLIP and VAE.

    Call inside `torch.inference_mode(False)` after `comfy.model_management.load_models_gpu`.
    """
    family = model_family(model)
    if family not in UNET_FAMILIES:
        raise ValueError(f"comfy_backend takes SD1.x/SDXL models, not {family}; use "
                         "comfy_families.family_backend.")
    import comfy.model_management as mm

    diffusion_model = model.model.diffusion_model
    _make_trainable_copyable(diffusion_model)
    _make_trainable_copyable(vae.first_stage_model)
    device = mm.get_torch_device()
    latent_format = model.model.latent_format
    return DiffusionBackend(
        denoiser=unet_denoiser(diffusion_model),
        schedule=noise_schedule(model),
        encode_prompts=prompt_encoder(model, clip, family, width, height),
        decode=vae_decoder(model, vae),
        latent_channels=int(latent_format.latent_channels),
        vae_scale_factor=vae_factor(vae),
        lora_target=diffusion_model,
        device=device,
        name=name,
        arch=family.lower(),
    )


def vae_factor(vae) -> int:
    """Image pixels per latent pixel of a ComfyUI VAE (8 for SD1.x/SDXL)."""
    return int(getattr(vae, "downscale_ratio", 8))


@contextlib.contextmanager
def training_session(model, vae) -> Iterator[None]:
    """Everything ComfyUI needs around a training run: grad mode on, and VAE + model loaded as
    ComfyUI loads them for sampling: fully where they fit, else partially (the layers left on the
    offload device have their weights cast to the compute device per forward by comfy.ops, in
    backward's recomputation too; the LoRA lives on the compute device, `add_lora`)."""
    import comfy.model_management as mm

    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([model, vae.patcher])
        yield
