"""One AlignProp optimiser step (Prabhudesai et al. 2023, Algorithm 1), and what it is made of.

`optimizer_step` draws prompts, x_T and the truncation K from one generator, samples through the
DDIM chain with the last K steps differentiable and checkpointed, decodes, scores with the reward,
backpropagates into the LoRA weights only and takes one AdamW step. `training.run.TrainRun` calls it
once per step; the bench calls it directly to time exactly the step the trainer runs.

Two optional penalties limit reward hacking: `TrainConfig.kl_weight` times the pull toward the base
model (`sampling.sampler.BasePull`, per micro-batch) and `TrainConfig.lora_l2_weight` times the
squared size of the LoRA's weight change (`lora.lora_delta_l2`, once per optimiser step: the weights
do not change between micro-batches).

On a rank of a data-parallel run (`parallel.world`) every draw is made for the global batch and the
rank keeps its rows (`parallel.shard`); the LoRA gradient is averaged over the ranks before clipping.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Sequence

import torch

from ..config import SamplerConfig, TrainConfig
from ..lora import adapters_off, lora_delta_l2
from ..models.backend import DiffusionBackend
from ..parallel.world import World, single_process
from ..rewards import RewardFn
from ..sampling.sampler import BasePull, draw_truncation, sample_images
from .augment import augment_for_reward


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cfg.lr_schedule.

    A pure function of the step, so a resumed run follows the same schedule with no extra state.
    """
    warm = cfg.lr_warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - warm, 1)
    frac = min((step - warm) / span, 1.0)  # 0 at the first step after warm-up
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters with the run's settings."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def make_scaler(device: torch.device, cfg: TrainConfig) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 autocast only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")


def autocast_context(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on the run's device; plain fp32 otherwise."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("TrainConfig.mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def reward_loss(rewards: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The loss of a batch's rewards: -mean (maximize) or mean |target - reward| (target)."""
    if cfg.loss == "maximize":
        return -rewards.mean()
    if cfg.loss == "target":
        return (cfg.reward_target - rewards).abs().mean()
    raise ValueError(f"TrainConfig.loss={cfg.loss!r} is not known; use maximize or target.")


def _base_pull(backend: DiffusionBackend, cfg: TrainConfig) -> BasePull | None:
    """A collector of the pull toward the base model, or None when kl_weight is 0 (no extra pass)."""
    if cfg.kl_weight <= 0:
        return None
    return BasePull(functools.partial(adapters_off, backend.lora_target))


@torch.no_grad()
def _lora_l2_value(backend: DiffusionBackend) -> float:
    return float(lora_delta_l2(backend.lora_target))


def _lora_l2(backend: DiffusionBackend, cfg: TrainConfig, scaler: torch.amp.GradScaler) -> float:
    """The L2 penalty's value; with lora_l2_weight > 0 its weighted gradient is accumulated too."""
    if cfg.lora_l2_weight <= 0:
        return _lora_l2_value(backend)
    l2 = lora_delta_l2(backend.lora_target)
    scaler.scale(cfg.lora_l2_weight * l2).backward()
    return l2.item()


def optimizer_step(backend: DiffusionBackend, reward: RewardFn, prompts: Sequence[str],
                   sampler: SamplerConfig, cfg: TrainConfig, params: list[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   gen: torch.Generator, step: int, world: World | None = None) -> dict[str, Any]:
    """cfg.grad_accum micro-batches of sample -> decode -> reward -> backward, then one AdamW step.

    Args:
        backend: the model, with LoRA layers whose parameters are `params`.
        reward: scores images (B, 3, H, W) in [0, 1] for their prompts.
        prompts: the training prompts, drawn with replacement.
        sampler, cfg: the sampler and training configs.
        params, optimizer, scaler: the LoRA parameters, their AdamW and the loss scaler.
        gen: the run's generator; every random draw of the step comes from it.
        step: 0-based index of this step (sets the learning rate).
        world: this rank of a data-parallel run (`parallel.world`): it samples its cfg.batch_size rows
            of each micro-batch's global batch (`parallel.shard`), the LoRA gradient is averaged over
            the ranks before clipping and the metrics are those of the global batch. Default: one
            process.

    Returns:
        The step's metrics: reward, loss (the minimised objective: reward loss plus the weighted
        penalties; the reward loss alone when both weights are 0), k, grad_norm, skipped (a
        non-finite reward skips the update), lr, pull (the pull toward the base model, mean over
        micro-batches; 0.0 when kl_weight is 0, as it is not computed), lora_l2 (the squared size of
        the LoRA's weight change at the step's start, always measured).
    """
    optimizer.zero_grad(set_to_none=True)
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    world = world or single_process()
    shard = world.shard
    rewards, losses, ks, pulls = [], [], [], []
    for _ in range(cfg.grad_accum):
        idx = shard.randint(len(prompts), cfg.batch_size, gen)
        batch_prompts = [prompts[i] for i in idx]
        shape = backend.latent_shape(cfg.batch_size, cfg.height, cfg.width)
        x_T = shard.randn(shape, gen).to(backend.device)  # (B, C, H/f, W/f)
        k = draw_truncation(sampler, gen)  # once per batch: the whole window is contiguous
        pull = _base_pull(backend, cfg)
        with autocast_context(backend.device, cfg.mixed_precision):
            images = sample_images(backend, batch_prompts, sampler, x_T, cfg.negative_prompt,
                                   grad_steps=k, generator=gen, pull=pull, shard=shard)
            # DRaFT-LV returns n + 1 estimates per prompt, in blocks of the batch's prompt order
            estimates = images.shape[0] // len(batch_prompts)
            scored = augment_for_reward(images.float(), cfg.reward_augment, gen, shard, estimates)
            r = reward(scored, batch_prompts * estimates).float()  # (estimates * B,)
        if not world.all_true(bool(torch.isfinite(r).all()), "whether the rewards are finite"):
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"the reward returned NaN/Inf for prompts {batch_prompts}; this optimiser "
                          "step is skipped and the LoRA is left unchanged.")
            return {"reward": math.nan, "loss": math.nan, "k": k, "grad_norm": math.nan, "skipped": True,
                    "lr": lr, "pull": math.nan, "lora_l2": _lora_l2_value(backend)}
        loss = reward_loss(r, cfg)  # over all estimates: DRaFT-LV's average of n + 1
        if pull is not None:
            pulled = pull.value()
            loss = loss + cfg.kl_weight * pulled
            pulls.append(pulled.item())
        scaler.scale(loss / cfg.grad_accum).backward()
        rewards += r[:len(batch_prompts)].detach().tolist()  # the sampled images' own rewards
        losses.append(loss.item())
        ks.append(k)
    l2 = _lora_l2(backend, cfg, scaler)
    world.average_grads(params)  # before unscaling: a rank's inf reaches every rank's check
    reward_sum, loss_sum, pull_sum = world.sum([sum(rewards), sum(losses), sum(pulls)], "the step's metrics")
    loss_mean = loss_sum / (len(losses) * world.size)
    if cfg.lora_l2_weight > 0:
        loss_mean += cfg.lora_l2_weight * l2
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])
                                         ) if grads else torch.zeros(())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return {"reward": reward_sum / (len(rewards) * world.size), "loss": loss_mean,
            "k": ks[0] if len(ks) == 1 else ks, "grad_norm": float(grad_norm), "skipped": False, "lr": lr,
            "pull": pull_sum / (len(pulls) * world.size) if pulls else 0.0, "lora_l2": l2}
