"""Differentiable DDIM sampling with truncated, gradient-checkpointed backpropagation (AlignProp §3).

The chain x_T -> x_0 runs T DDIM steps. Only the last K steps (the gradient window) are recorded by
autograd; earlier steps run under `no_grad`, which is the paper's truncated backpropagation. Each step
inside the window is wrapped in the reentrant `torch.utils.checkpoint`, so autograd keeps one latent
and one graph node per step instead of the UNet's activations and graph, and recomputes the UNet
during backward (train with `loss.backward()`; `torch.autograd.grad` cannot pass that checkpoint). K is drawn
once per sample batch (`draw_truncation`), never per step: the reference implementation re-draws it at
every denoising step, which makes the window non-contiguous. On the CPU, freed heap pages are handed
back to the OS around every window step (glibc `malloc_trim`), so allocator retention does not make
peak RSS grow with K.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..config import SamplerConfig
from ..models.backend import Cond, Denoiser, DiffusionBackend
from .conditioning import batch_conds, can_batch
from .schedule import NoiseSchedule, ddim_step


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


def guided_prediction(denoiser: Denoiser, x_t: torch.Tensor, t: int, cond: Cond,
                      uncond: Cond | None, guidance_scale: float) -> torch.Tensor:
    """Denoiser output with classifier-free guidance, both branches in one batched call.

    When batching would repeat the shorter context too often (ComfyUI's limit, see
    `conditioning.can_batch`), the branches run as two calls instead, with the same result.
    """
    ts = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    if uncond is None:
        return denoiser(x_t, ts, cond)
    if can_batch([uncond, cond]):
        out_u, out_c = denoiser(torch.cat([x_t, x_t]), torch.cat([ts, ts]), _cat_cond(uncond, cond)).chunk(2)
    else:
        out_u, out_c = denoiser(x_t, ts, uncond), denoiser(x_t, ts, cond)
    return out_u + guidance_scale * (out_c - out_u)


def _denoise_step(x_t: torch.Tensor, noise: torch.Tensor | None, cond: Cond, uncond: Cond | None,
                  denoiser: Denoiser, schedule: NoiseSchedule, t: int, t_prev: int,
                  cfg: SamplerConfig) -> torch.Tensor:
    out = guided_prediction(denoiser, x_t, t, cond, uncond, cfg.guidance_scale)
    return ddim_step(out, x_t, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), cfg.eta,
                     schedule.prediction_type, noise)


def _checkpointed_step(x_t: torch.Tensor, args: tuple) -> torch.Tensor:
    """One denoising step under the reentrant checkpoint: the forward runs without building any
    graph, and backward re-runs it with grad enabled and backpropagates through that copy.

    Reentrant on purpose: the non-reentrant checkpoint records the step's whole autograd graph (one
    node per op, with placeholders for the saved tensors), which cost ~0.7 MiB per step on the toy
    UNet, so peak memory still grew with K (toy world, K=20: 1.9x that of K=1); the reentrant one
    adds a single node per step (1.02x). Its conditions: gradient reaches the LoRA weights only if a
    tensor input requires grad, hence the detached leaf for the window's first step, and the result
    must be backpropagated with `.backward()`: `torch.autograd.grad(loss, params)` raises.
    """
    if not x_t.requires_grad:
        x_t = x_t.detach().requires_grad_(True)
    return checkpoint(_denoise_step, x_t, *args, use_reentrant=True)


def sample_latents(denoiser: Denoiser, schedule: NoiseSchedule, x_T: torch.Tensor, cond: Cond,
                   uncond: Cond | None, cfg: SamplerConfig, grad_steps: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the DDIM chain from x_T; the last `grad_steps` steps are differentiable.

    Args:
        denoiser: model-output callable (see `models.backend.Denoiser`).
        schedule: the model's noise schedule.
        x_T: initial noise, (B, C, h, w).
        cond, uncond: conditioning of the prompts and of the negative prompt (uncond None: no CFG).
        cfg: sampler settings (steps, eta, guidance, checkpointing).
        grad_steps: K; 0 runs the whole chain without gradient.
        generator: source of the eta > 0 noise; it is drawn at every step, inside the window or not,
            so the random stream does not depend on K.

    Returns:
        x_0 latents, (B, C, h, w); attached to the graph when grad_steps > 0 and grad is enabled.
    """
    if not 0 <= grad_steps <= cfg.steps:
        raise ValueError(f"grad_steps={grad_steps} is outside [0, steps={cfg.steps}].")
    if cfg.use_cfg and uncond is None:
        raise ValueError("SamplerConfig.use_cfg is on but no unconditional conditioning was given.")
    uncond = uncond if cfg.use_cfg else None
    timesteps = schedule.timesteps(cfg.steps)
    first_grad_step = cfg.steps - grad_steps
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = schedule.previous_timestep(t, cfg.steps)
        noise = None
        if cfg.eta > 0:
            # drawn on the generator's device so a CPU generator gives the same noise on any device
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_device,
                                dtype=x.dtype).to(x.device)
        args = (noise, cond, uncond, denoiser, schedule, t, t_prev, cfg)
        if i < first_grad_step or not torch.is_grad_enabled():
            with torch.no_grad():
                x = _denoise_step(x, *args)
        elif cfg.checkpoint_unet:
            x = _checkpointed_step(x, args)
            if x.device.type == "cpu":
                _release_freed_heap(x)  # this step's discarded activations
                if x.requires_grad:
                    x.register_hook(_release_freed_heap)  # the next stage's recomputed ones, in backward
        else:
            x = _denoise_step(x, *args)
    return x


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


def decode_images(backend: DiffusionBackend, latents: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Latents -> images in [0,1]; optionally checkpointed so the decoder's activations are not kept."""
    if use_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
        return checkpoint(backend.decode, latents, use_reentrant=False)
    return backend.decode(latents)


def sample_images(backend: DiffusionBackend, prompts: Sequence[str], cfg: SamplerConfig,
                  x_T: torch.Tensor, negative_prompt: str = "", grad_steps: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompts + initial noise -> images (B,3,H,W) in [0,1], differentiable through the last K steps."""
    if len(prompts) != x_T.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts but {x_T.shape[0]} initial latents; "
                         "give one prompt per latent.")
    with torch.no_grad():
        cond = backend.encode_prompts(list(prompts))
        uncond = backend.encode_prompts([negative_prompt] * len(prompts)) if cfg.use_cfg else None
    latents = sample_latents(backend.denoiser, backend.schedule, x_T, cond, uncond, cfg,
                             grad_steps, generator)
    return decode_images(backend, latents, cfg.checkpoint_vae)

