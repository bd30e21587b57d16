"""The ComfyUI adapter for rectified-flow MODELs (SD3/SD3.5, FLUX.1, Z-Image): MODEL, CLIP, VAE -> backend.

The core's flow `Denoiser` takes t = 1000 sigma and returns the velocity v = e - x0. ComfyUI's
flow models carry a CONST `model_sampling` (x_sigma = (1 - sigma) x0 + sigma e):
- schedule: SD3's `ModelSamplingDiscreteFlow` and FLUX's `ModelSamplingFlux` both warp a uniform
  grid u by s = a u / (1 + (a - 1) u), with a = shift for SD3 and a = exp(shift) for FLUX (there
  `shift` is the mu of the image-size rule, fixed by the model config or a ModelSamplingFlux node,
  not recomputed from the latent size). That is a static `FlowSchedule` shift; KSampler's "simple"
  scheduler walks u = 1, 1 - 1/n, ..., 1/n (FlowSchedule's "flux" grid) and "normal" walks
  linspace(1, u_min, n) with u_min the shifted 1/1000 (the "default" grid, SD3 only).
- denoiser: ComfyUI's own `BaseModel.apply_model` with the conditioning built by the model's
  `extra_conds`, so each family's input handling (timestep scaling, FLUX's 2x2 packing and
  position ids, dtype casts) stays ComfyUI's. It returns x0 = x - sigma v; the velocity is
  recovered as (x - x0) / sigma. That costs one float32 rounding of x0 divided by sigma, the same
  precision ComfyUI's own samplers work with, and sigma is never 0 at a model call. FLUX's blocks
  add residuals in place after a LayerNorm saved them, so with gradient on, each LayerNorm gets a
  copy of its input for the length of the call (`_norm_inputs_copied`).
- prompts: CLIP.tokenize + encode_from_tokens -> {"context", "pooled"}, the keys of the diffusers
  SD3/FLUX backends, so the sampler adds FLUX-dev's distilled "guidance" the same way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

from alignprop_core.models.backend import Cond, Denoiser, DiffusionBackend
from alignprop_core.sampling.conditioning import concat_token_sequences
from alignprop_core.sampling.flow_schedule import FlowSchedule

from .comfy_model import _make_trainable_copyable, vae_decoder, vae_factor

# comfy.model_base class -> DiffusionBackend.arch
FLOW_FAMILIES = {"SD3": "sd3", "Flux": "flux", "Lumina2": "zimage"}
# families whose text conditioning has no pooled vector, and whose captions join the image tokens in
# one sequence (their positions follow the caption), so each prompt runs at its own token count
UNPOOLED = ("zimage",)
SCHEDULERS = ("simple", "normal")  # KSampler schedulers whose sigmas a FlowSchedule reproduces
TIMESTEP_SCALE = 1000.0  # the core feeds flow denoisers t = 1000 sigma
DEFAULT_GUIDANCE = 3.5  # ComfyUI's FLUX conditioning default (FluxGuidance node's default too)


def flow_arch(model) -> str:
    """'sd3', 'flux' or 'zimage' for a ComfyUI MODEL (ModelPatcher); ValueError naming the families
    otherwise (the node's family check has already told Z-Image from Lumina Image 2.0).

    Only these exact classes: subclasses such as Chroma or Flux2 take other inputs.
    """
    import comfy.model_base as mb

    base = getattr(model, "model", None)
    for cls_name, arch in FLOW_FAMILIES.items():
        if type(base) is getattr(mb, cls_name):
            return arch
    found = type(base).__name__ if base is not None else type(model).__name__
    raise ValueError(f"this MODEL is {found}; the flow backend takes SD3/SD3.5 (SD3), FLUX.1 (Flux) and "
                     "Z-Image (Lumina2) models. Load one with Load Checkpoint or Load Diffusion Model.")


def flow_schedule_of(model, scheduler: str = "simple") -> FlowSchedule:
    """The `FlowSchedule` whose sigmas equal KSampler's for this MODEL's model_sampling.

    Args:
        model: a ComfyUI MODEL whose model_sampling is CONST (SD3's ModelSamplingDiscreteFlow or
            FLUX's ModelSamplingFlux, possibly replaced by a ModelSamplingSD3/Flux node).
        scheduler: the KSampler scheduler to match: "simple" (equal when the step count divides the
            model's 1000 (SD3) or 10000 (FLUX) table entries; otherwise each sigma is off by under
            one table entry, as ComfyUI rounds the index down) or "normal" (SD3's 1000-entry table).

    Returns:
        A static-shift schedule (ComfyUI does not shift by image size at sampling time).
    """
    import comfy.model_sampling as ms_lib

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not one a FlowSchedule reproduces; use one of "
                         f"{', '.join(SCHEDULERS)}.")
    sampling = model.get_model_object("model_sampling")
    name = type(sampling).__name__
    if not isinstance(sampling, ms_lib.CONST):
        raise ValueError(f"model sampling {name} is not a rectified flow (CONST); the flow backend "
                         "needs an SD3/SD3.5 or FLUX.1 model.")
    if isinstance(sampling, ms_lib.ModelSamplingFlux):
        a = math.exp(float(sampling.shift))
    elif isinstance(sampling, ms_lib.ModelSamplingDiscreteFlow):
        a = float(sampling.shift)
    else:
        raise ValueError(f"model sampling {name} is a flow the backend does not know; it reads SD3's "
                         "ModelSamplingDiscreteFlow and FLUX's ModelSamplingFlux.")
    if scheduler == "normal" and len(sampling.sigmas) != int(TIMESTEP_SCALE):
        raise ValueError(f"the 'normal' scheduler on {name} ({len(sampling.sigmas)} sigmas) ends at a "
                         "noise level a FlowSchedule cannot express; use scheduler='simple'.")
    return FlowSchedule(num_train_timesteps=int(TIMESTEP_SCALE), shift=a, use_dynamic_shifting=False,
                        sigma_grid="flux" if scheduler == "simple" else "default",
                        patch_size=patch_size_of(model))


def patch_size_of(model) -> int:
    """Latent cells per transformer token side (2 for SD3 and FLUX.1)."""
    size = model.model.model_config.unet_config.get("patch_size", 2)
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def takes_guidance(model) -> bool:
    """Whether the model embeds distilled guidance (FLUX.1-dev) as an input."""
    return flow_arch(model) == "flux" and bool(model.model.model_config.unet_config.get("guidance_embed"))


def flow_denoiser(model) -> Denoiser:
    """ComfyUI's `apply_model` as a flow `Denoiser`: (x_t, t = 1000 sigma, cond) -> velocity.

    `cond` holds "context" (B, L, D), "pooled" (B, P) (not for Z-Image) and, for FLUX.1-dev,
    "guidance" (B,). With "tokens" (B,), each sample's context is its first tokens[i] tokens (the
    rest is padding or repetition from batching), and samples run grouped by that count, each group
    exactly as ComfyUI runs one prompt.
    Differentiable in x_t, the conditioning and any LoRA injected into `model.model.diffusion_model`
    (call `flow_backend` first: it gives inference-mode weights normal storage).
    """
    base = model.model
    guided = takes_guidance(model)
    norms = [m for m in base.diffusion_model.modules() if isinstance(m, torch.nn.LayerNorm)]

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = t.to(x_t.device, torch.float32) / TIMESTEP_SCALE  # (B,)
        if not bool((sigma > 0).all()):
            raise ValueError("the flow denoiser was called at sigma = 0, where the velocity is undefined "
                             "from ComfyUI's x0; the sampler never evaluates the model there.")
        if "tokens" not in cond:
            return velocity(x_t, sigma, cond)
        counts = [int(n) for n in cond["tokens"].tolist()]
        order, parts = [], []
        for count in sorted(set(counts)):
            rows = [i for i, n in enumerate(counts) if n == count]
            index = torch.tensor(rows, device=x_t.device)
            part = {k: v[index] for k, v in cond.items() if k != "tokens"}
            part["context"] = part["context"][:, :count]
            parts.append(velocity(x_t[index], sigma[index], part))
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(parts)[inverse.to(x_t.device)]

    def velocity(x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        # guidance=None keeps extra_conds from adding its scalar default; ours is per sample
        conds = base.extra_conds(cross_attn=cond["context"], pooled_output=cond.get("pooled"), guidance=None,
                                 noise=x_t, device=x_t.device)
        if "c_concat" in conds:
            raise ValueError(f"this {type(base).__name__} model takes an image condition (a Fill, Canny or "
                             "Depth variant); the flow backend trains text-to-image models only.")
        kwargs = {key: c.cond for key, c in conds.items()}
        if guided:
            if "guidance" not in cond:
                raise ValueError("this FLUX.1 model takes distilled guidance but the conditioning has "
                                 "no 'guidance' entry; sample through sampling.sampler.sample_images, "
                                 "which adds it.")
            kwargs["guidance"] = cond["guidance"].to(x_t.device, torch.float32)
        context = kwargs.pop("c_crossattn")
        with _norm_inputs_copied(norms):
            x0 = base.apply_model(x_t, sigma, c_crossattn=context, transformer_options={}, **kwargs)
        return ((x_t - x0.to(x_t.dtype)) / sigma.view(-1, *[1] * (x_t.ndim - 1))).to(x_t.dtype)

    return denoise


def _copy_first_input(module: torch.nn.Module, args: tuple):
    x = args[0] if args else None
    return (x.clone(), *args[1:]) if isinstance(x, torch.Tensor) and x.requires_grad else None


@contextlib.contextmanager
def _norm_inputs_copied(norms: list[torch.nn.Module]) -> Iterator[None]:
    """Feed each LayerNorm a copy of its input during one model call.

    ComfyUI's FLUX blocks add their residuals in place (``x += ...``) after a LayerNorm has saved x
    for its backward, which autograd refuses once x carries gradient (a LoRA upstream, or x_t from
    the previous step of the window). A copy costs one activation per norm; the hooks live only for
    the call (the reentrant checkpoint re-runs it, hooks included), so the shared model is left as
    it was.
    """
    if not torch.is_grad_enabled():
        yield
        return
    handles = [m.register_forward_pre_hook(_copy_first_input) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def flow_prompt_encoder(clip, pooled: bool = True):
    """prompts -> {"context": (B, L, D), "pooled": (B, P)}, encoded once per distinct prompt.

    ``pooled`` False (Z-Image): no pooled vector; the contexts are zero-padded to the longest and
    "tokens" (B,) holds each prompt's own token count (see `flow_denoiser`).
    """
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def encode_one(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if text not in cache:
            context, vector = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            if pooled and vector is None:
                raise ValueError("this CLIP gives no pooled output, which SD3 and FLUX.1 need; load "
                                 "the model's own text encoders (DualCLIPLoader / TripleCLIPLoader).")
            cache[text] = (context.detach().clone(), vector.detach().clone() if pooled else None)
        return cache[text]

    def encode(prompts: Sequence[str]) -> Cond:
        pairs = [encode_one(p) for p in prompts]
        if not pooled:
            contexts = [c for c, _ in pairs]
            longest = max(c.shape[1] for c in contexts)
            return {"context": torch.cat([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1]))
                                          for c in contexts]),
                    "tokens": torch.tensor([float(c.shape[1]) for c in contexts])}
        # long prompts have more tokens: repeated to a common length, as ComfyUI's CONDCrossAttn does
        return {"context": concat_token_sequences([c for c, _ in pairs], "context"),
                "pooled": torch.cat([p for _, p in pairs])}

    return encode


def flow_backend(model, clip, vae, width: int, height: int, name: str = "comfyui-flow-model",
                 scheduler: str = "simple") -> DiffusionBackend:
    """A `DiffusionBackend` over a ComfyUI SD3/SD3.5 or FLUX.1 MODEL, its CLIP and VAE.

    Call inside `torch.inference_mode(False)` after `comfy.model_management.load_models_gpu`.

    Args:
        model, clip, vae: what the loaders return.
        width, height: image size in pixels; checked against the VAE factor times the patch size.
        name: recorded in LoRA metadata.
        scheduler: the KSampler scheduler whose sigmas the sampler reproduces (`flow_schedule_of`).
    """
    import comfy.model_management as mm

    from alignprop_core.models.backend import check_image_size

    arch = flow_arch(model)
    patch = patch_size_of(model)
    check_image_size(width, height, vae_factor(vae), patch)
    schedule = flow_schedule_of(model, scheduler)
    diffusion_model = model.model.diffusion_model
    _make_trainable_copyable(diffusion_model)
    _make_trainable_copyable(vae.first_stage_model)
    guided = takes_guidance(model)
    return DiffusionBackend(
        denoiser=flow_denoiser(model),
        schedule=schedule,
        encode_prompts=flow_prompt_encoder(clip, pooled=arch not in UNPOOLED),
        decode=vae_decoder(model, vae),
        latent_channels=int(model.model.latent_format.latent_channels),
        vae_scale_factor=vae_factor(vae),
        lora_target=diffusion_model,
        device=mm.get_torch_device(),
        name=name,
        arch=arch,
        patch_size=patch,
        guidance_input=guided,
        default_guidance=DEFAULT_GUIDANCE if guided else None,
    )

