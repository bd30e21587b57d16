"""Differentiable sampling with truncated, gradient-checkpointed backpropagation (AlignProp §3).

The chain x_T -> x_0 runs T steps of the model's sampler (`chain.make_chain`: DDIM for epsilon/v
models, the Euler ODE for rectified flow). Only the last K steps (the gradient window) are recorded
by autograd; earlier steps run under `no_grad`, which is the paper's truncated backpropagation. Each
step inside the window is wrapped in the reentrant `torch.utils.checkpoint`, so autograd keeps one
latent and one graph node per step instead of the denoiser's activations and graph, and recomputes
the denoiser during backward (train with `loss.backward()`; `torch.autograd.grad` cannot pass that
checkpoint). K is drawn once per sample batch (`draw_truncation`), never per step: the reference
implementation re-draws it at every denoising step, which makes the window non-contiguous. On the
CPU, freed heap pages are handed back to the OS around every window step (glibc `malloc_trim`), so
allocator retention does not make peak RSS grow with K.

The DRaFT-LV estimator (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards") keeps K = 1 and adds n lower-variance copies of the last step: the chain's result,
stopped from gradient, is re-noised to the last step's noise level with fresh noise and denoised
again with gradient, n times; the n + 1 results are returned as one batch, and the loss averages
the reward over them.

The pull toward the base model (`BasePull`, asked for by passing one to `sample_latents` or
`sample_images`) runs the denoiser a second time on every step that carries gradient, with the LoRA
adapters off, at the same x_t, and records per sample the mean squared difference of the two guided
predictions. Both passes sit inside the step's checkpointed function, so memory stays per step, and
gradient reaches the LoRA through the adapted prediction and, through x_t, the earlier window steps.

The decode at the end can run in overlapping tiles (`SamplerConfig.vae_tile`, see `tiled_decode`), so
the VAE decoder's activations are bounded by one tile.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..config import SamplerConfig
from ..models.backend import Cond, Denoiser, DiffusionBackend
from ..parallel.shard import ONE, Shard
from .chain import Schedule, Step, check_eta, make_chain
from .conditioning import batch_conds, can_batch
from .tiled_decode import tiled_decode


def draw_truncation(cfg: SamplerConfig, generator: torch.Generator) -> int:
    """K, the number of final denoising steps that carry gradient, for one sample batch."""
    if cfg.truncation == "fixed":
        return cfg.k
    if cfg.truncation == "uniform":
        return int(torch.randint(cfg.k_min, cfg.k_max + 1, (1,), generator=generator).item())
    if cfg.truncation == "gaussian":
        k = cfg.k_mean + cfg.k_std * torch.randn((1,), generator=generator, dtype=torch.float64).item()
        return int(min(max(round(k), 1), cfg.steps))
    raise ValueError(f"SamplerConfig.truncation={cfg.truncation!r} is not known; "
                     "use one of fixed, uniform, gaussian.")


def _cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """The two CFG branches as one batch; contexts of different token lengths (a long prompt or
    negative prompt) are repeated to a common length, which leaves cross-attention unchanged."""
    return batch_conds([uncond, cond])


def guided_prediction(denoiser: Denoiser, x_t: torch.Tensor, t: int | float, cond: Cond,
                      uncond: Cond | None, guidance_scale: float) -> torch.Tensor:
    """Denoiser output with classifier-free guidance, both branches in one batched call.

    `t` is an integer timestep (DDIM models: fed as long) or a float one (flow models: float32).
    When batching would repeat the shorter context too often (ComfyUI's limit, see
    `conditioning.can_batch`), the branches run as two calls instead, with the same result.
    """
    dtype = torch.long if isinstance(t, int) else torch.float32
    ts = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=dtype)
    if uncond is None:
        return denoiser(x_t, ts, cond)
    if can_batch([uncond, cond]):
        out_u, out_c = denoiser(torch.cat([x_t, x_t]), torch.cat([ts, ts]), _cat_cond(uncond, cond)).chunk(2)
    else:
        out_u, out_c = denoiser(x_t, ts, uncond), denoiser(x_t, ts, cond)
    return out_u + guidance_scale * (out_c - out_u)


@dataclass
class BasePull:
    """Collects the pull toward the base model over one sample batch's gradient window.

    Give one to `sample_latents`/`sample_images`; every step that carries gradient (DRaFT-LV's
    copies included) appends its term, per sample mean over the non-batch dims of
    (out_lora - out_base)^2 in float32, shape (B,), where out_base is the guided prediction at the
    same x_t run inside `adapters_off()` (e.g. `functools.partial(lora.adapters_off, module)`).
    """

    adapters_off: Callable[[], ContextManager]  # a fresh context with the LoRA's effect at zero
    terms: list[torch.Tensor] = field(default_factory=list)  # one (B,) per window step

    def value(self) -> torch.Tensor:
        """Mean over window steps and samples (a float32 scalar); 0 if no step carried gradient."""
        if not self.terms:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack(self.terms).mean()


def _denoise_step(x_t: torch.Tensor, noise: torch.Tensor | None, cond: Cond, uncond: Cond | None,
                  denoiser: Denoiser, step: Step, cfg: SamplerConfig) -> torch.Tensor:
    out = guided_prediction(denoiser, x_t, step.t, cond, uncond, cfg.guidance_scale)
    return step.update(out, x_t, noise)


def _pulled_step(x_t: torch.Tensor, noise: torch.Tensor | None, cond: Cond, uncond: Cond | None,
                 denoiser: Denoiser, step: Step, cfg: SamplerConfig,
                 adapters_off: Callable[[], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_denoise_step` plus the base model's prediction at the same x_t: (x_next, pull term (B,))."""
    out = guided_prediction(denoiser, x_t, step.t, cond, uncond, cfg.guidance_scale)
    with adapters_off():
        base = guided_prediction(denoiser, x_t, step.t, cond, uncond, cfg.guidance_scale)
    diff = out.float() - base.float()
    term = diff.square().mean(dim=tuple(range(1, diff.dim())))
    return step.update(out, x_t, noise), term


def _checkpointed_step(x_t: torch.Tensor, args: tuple, fn: Callable = _denoise_step
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One denoising step under the reentrant checkpoint: the forward runs without building any
    graph, and backward re-runs it with grad enabled and backpropagates through that copy.

    Reentrant on purpose: the non-reentrant checkpoint records the step's whole autograd graph (one
    node per op, with placeholders for the saved tensors), which cost ~0.7 MiB per step on the toy
    UNet, so peak memory still grew with K (toy world, K=20: 1.9x that of K=1); the reentrant one
    adds a single node per step (1.02x). Its conditions: gradient reaches the LoRA weights only if a
    tensor input requires grad, hence the detached leaf for the window's first step, and the result
    must be backpropagated with `.backward()`: `torch.autograd.grad(loss, params)` raises.
    `fn` is the step (`_denoise_step`, or `_pulled_step` whose two outputs both carry gradient).
    """
    if not x_t.requires_grad:
        x_t = x_t.detach().requires_grad_(True)
    return checkpoint(fn, x_t, *args, use_reentrant=True)


def _draw_noise(x: torch.Tensor, generator: torch.Generator | None, shard: Shard = ONE) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device so a CPU generator gives
    the same noise on any device; on a rank of a data-parallel run, this rank's rows of the noise of
    the global batch (`parallel.shard`)."""
    gen_device = generator.device if generator is not None else x.device
    return shard.randn(tuple(x.shape), generator, device=gen_device, dtype=x.dtype).to(x.device)


def _grad_step(x: torch.Tensor, args: tuple, cfg: SamplerConfig, pull: BasePull | None = None
               ) -> torch.Tensor:
    """One denoising step that carries gradient: checkpointed (see `_checkpointed_step`) or plain;
    with `pull`, the step also runs the base model and appends its pull term there."""
    fn, fn_args = (_denoise_step, args) if pull is None else (_pulled_step, (*args, pull.adapters_off))
    x = _checkpointed_step(x, fn_args, fn) if cfg.checkpoint_unet else fn(x, *fn_args)
    if pull is not None:
        x, term = x
        pull.terms.append(term)
    if cfg.checkpoint_unet and x.device.type == "cpu":
        _release_freed_heap(x)  # this step's discarded activations
        if x.requires_grad:
            x.register_hook(_release_freed_heap)  # the next stage's recomputed ones, in backward
    return x


def sample_latents(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, cond: Cond,
                   uncond: Cond | None, cfg: SamplerConfig, grad_steps: int,
                   generator: torch.Generator | None = None, pull: BasePull | None = None,
                   shard: Shard = ONE) -> torch.Tensor:
    """Run the sampling chain from x_T; the last `grad_steps` steps are differentiable.

    Args:
        denoiser: model-output callable (see `models.backend.Denoiser`).
        schedule: the model's noise levels (`NoiseSchedule`: DDIM; `FlowSchedule`: Euler ODE).
        x_T: initial noise, (B, C, h, w).
        cond, uncond: conditioning of the prompts and of the negative prompt (uncond None: no CFG).
        cfg: sampler settings (steps, eta, guidance, checkpointing, estimator).
        grad_steps: K; 0 runs the whole chain without gradient.
        generator: source of the eta > 0 noise and of DRaFT-LV's re-noising; the eta noise is drawn
            at every step, inside the window or not, so the random stream does not depend on K.
        pull: when given, every step that carries gradient also runs the base model and appends its
            pull term to `pull.terms` (one more denoiser pass per such step; see `BasePull`). The
            result and the random stream are the same as without it.
        shard: which rows of the global batch x_T is, on a rank of a data-parallel run: every noise
            draw is made for the global batch and this rank's rows are kept.

    Returns:
        x_0 latents, (B, C, h, w); attached to the graph when grad_steps > 0 and grad is enabled.
        With the DRaFT-LV estimator and gradient on: ((n + 1) B, C, h, w), the chain's own result
        first, then the n re-noised copies of its last step, each in prompt order.
    """
    if not 0 <= grad_steps <= cfg.steps:
        raise ValueError(f"grad_steps={grad_steps} is outside [0, steps={cfg.steps}].")
    if cfg.use_cfg and uncond is None:
        raise ValueError("SamplerConfig.use_cfg is on but no unconditional conditioning was given.")
    uncond = uncond if cfg.use_cfg else None
    chain = make_chain(schedule, cfg.steps, cfg.eta, tuple(x_T.shape))
    first_grad_step = cfg.steps - grad_steps
    x = x_T
    for i, step in enumerate(chain):
        noise = _draw_noise(x, generator, shard) if step.needs_noise else None
        args = (noise, cond, uncond, denoiser, step, cfg)
        if i < first_grad_step or not torch.is_grad_enabled():
            with torch.no_grad():
                x = _denoise_step(x, *args)
        else:
            x = _grad_step(x, args, cfg, pull)
    if cfg.estimator == "draft_lv" and grad_steps > 0 and torch.is_grad_enabled():
        x = torch.cat([x, *_lv_copies(x, chain[-1], cond, uncond, denoiser, cfg, generator, pull, shard)])
    return x


def _lv_copies(x0: torch.Tensor, last: Step, cond: Cond, uncond: Cond | None, denoiser: Denoiser,
               cfg: SamplerConfig, generator: torch.Generator | None,
               pull: BasePull | None = None, shard: Shard = ONE) -> list[torch.Tensor]:
    """DRaFT-LV's n extra estimates: the stop-gradient result re-noised to the last step's level
    with fresh noise, then denoised by that step with gradient."""
    clean = x0.detach()
    copies = []
    for _ in range(cfg.lv_samples):
        x_t = last.renoise(clean, _draw_noise(clean, generator, shard))
        noise = _draw_noise(clean, generator, shard) if last.needs_noise else None
        copies.append(_grad_step(x_t, (noise, cond, uncond, denoiser, last, cfg), cfg, pull))
    return copies


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_heap(tensor: torch.Tensor) -> torch.Tensor:
    """Hand freed heap pages back to the OS; returns `tensor` so it also serves as a gradient hook.

    Called after each checkpointed step's forward (its activations were just discarded) and, as a
    hook on the step's output, in backward once the later stage's recomputed activations are freed.
    glibc keeps freed pages resident and does not reuse them well across the steps' interleaved
    allocations, so without this the peak RSS of a step grew with K (K=20: ~5x that of K=1 on the
    tiny model) although the live memory does not."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return tensor


def decode_images(backend: DiffusionBackend, latents: torch.Tensor, use_checkpoint: bool,
                  tile: int = 0, overlap: int = 0) -> torch.Tensor:
    """Latents -> images in [0,1]; optionally checkpointed so the decoder's activations are not kept.

    With `tile` > 0 (image pixels, a multiple of the VAE factor) the latents are decoded in tiles
    overlapping by `overlap` pixels (`tiled_decode`), each checkpointed when `use_checkpoint` is on.
    """
    if tile:
        f = backend.vae_scale_factor
        return tiled_decode(backend.decode, latents, tile // f, overlap // f, f, use_checkpoint)
    if use_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
        return checkpoint(backend.decode, latents, use_reentrant=False)
    return backend.decode(latents)


def check_sampler_fits(backend: DiffusionBackend, cfg: SamplerConfig) -> None:
    """Refuse sampler settings the model cannot take, before any work: distilled guidance on a model
    without that input, eta > 0 on a flow model (`chain.make_chain` says why), and VAE tiles that are
    not whole latent cells."""
    check_model_takes(cfg, backend.name, backend.guidance_input)
    check_eta(backend.schedule, cfg.eta)
    check_vae_tiles(cfg, backend.vae_scale_factor)


def check_vae_tiles(cfg: SamplerConfig, vae_factor: int) -> None:
    """ValueError unless the VAE tiles are whole latent cells (hosts call this from what they know
    of the model before loading it)."""
    f = vae_factor
    if cfg.vae_tile and (cfg.vae_tile % f or cfg.vae_tile_overlap % f):
        raise ValueError(f"SamplerConfig.vae_tile={cfg.vae_tile} and SamplerConfig.vae_tile_overlap="
                         f"{cfg.vae_tile_overlap} must be multiples of the VAE factor {f}; round them to "
                         f"multiples of {f}.")


def check_model_takes(cfg: SamplerConfig, name: str, guidance_input: bool) -> None:
    """ValueError for distilled guidance on a model without that input (hosts call this from what
    they know of the model before loading it)."""
    if cfg.distilled_guidance and not guidance_input:
        raise ValueError(f"SamplerConfig.distilled_guidance={cfg.distilled_guidance} was given, but "
                         f"{name} has no guidance input (only guidance-distilled models such "
                         "as FLUX.1-dev have one); set it to 0 and use guidance_scale with use_cfg "
                         "for classifier-free guidance.")


def with_guidance(backend: DiffusionBackend, cfg: SamplerConfig, cond: Cond) -> Cond:
    """`cond` plus the distilled-guidance input (B,) when the model takes one."""
    if not backend.guidance_input:
        return cond
    scale = cfg.distilled_guidance or backend.default_guidance
    if scale is None:
        raise ValueError(f"{backend.name} takes a distilled-guidance input; set "
                         "SamplerConfig.distilled_guidance (FLUX.1-dev uses 3.5).")
    batch = next(iter(cond.values())).shape[0]
    return {**cond, "guidance": torch.full((batch,), float(scale), device=backend.device)}


def sample_images(backend: DiffusionBackend, prompts: Sequence[str], cfg: SamplerConfig,
                  x_T: torch.Tensor, negative_prompt: str = "", grad_steps: int = 0,
                  generator: torch.Generator | None = None, pull: BasePull | None = None,
                  shard: Shard = ONE) -> torch.Tensor:
    """Prompts + initial noise -> images (B,3,H,W) in [0,1], differentiable through the last K steps.

    With the DRaFT-LV estimator and gradient on, ((n + 1) B, 3, H, W): see `sample_latents`, which
    also says what `pull` and `shard` do.
    """
    if len(prompts) != x_T.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts but {x_T.shape[0]} initial latents; "
                         "give one prompt per latent.")
    check_sampler_fits(backend, cfg)
    with torch.no_grad():
        cond = with_guidance(backend, cfg, backend.encode_prompts(list(prompts)))
        uncond = (with_guidance(backend, cfg, backend.encode_prompts([negative_prompt] * len(prompts)))
                  if cfg.use_cfg else None)
    latents = sample_latents(backend.denoiser, backend.schedule, x_T, cond, uncond, cfg,
                             grad_steps, generator, pull, shard)
    return decode_images(backend, latents, cfg.checkpoint_vae, cfg.vae_tile, cfg.vae_tile_overlap)
