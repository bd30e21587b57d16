"""The AlignProp training loop (Prabhudesai et al. 2023, Algorithm 1).

Each optimiser step: draw prompts and x_T, draw K once, sample through the DDIM chain with the last K
steps differentiable and checkpointed, decode, score with the reward, backpropagate the loss into the
LoRA weights only, and take an AdamW step. Every random draw comes from one `torch.Generator` whose
state is saved with the run, so the same seed gives the same LoRA and a resumed run is bit-identical
to an uninterrupted one (on the CPU). Nothing here knows ComfyUI: progress and cancellation come in
through the `on_step` and `should_stop` callbacks.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import LoraConfig, SamplerConfig, TrainConfig, to_dict
from ..files.outputs import check_writable, claim, lora_file_name, partial_path
from ..lora import LoraFile, add_lora, apply_lora_file, lora_state_dict, save_lora, set_lora_state_dict
from ..models.backend import DiffusionBackend
from ..rewards import RewardFn
from ..sampling.sampler import draw_truncation, sample_images
from .augment import augment_for_reward
from .train_state import TrainState, load_train_state, save_train_state

OnStep = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a run produced."""

    lora_path: Path | None  # the LoRA written: the final name, or <name>-partial if stopped early
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of every optimiser step
    evals: list[dict[str, Any]] = field(default_factory=list)  # held-out reward at eval points
    stopped_early: bool = False  # should_stop() or Ctrl-C ended the run before train.steps


def learning_rate(train: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then train.lr_schedule.

    A pure function of the step, so a resumed run follows the same schedule with no extra state.
    """
    warm = train.lr_warmup_steps
    if step < warm:
        return train.lr * (step + 1) / warm
    if train.lr_schedule == "constant":
        return train.lr
    span = max(train.steps - warm, 1)
    frac = min((step - warm) / span, 1.0)  # 0 at the first step after warm-up
    if train.lr_schedule == "linear":
        return train.lr * (1.0 - frac)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def autocast_context(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on the run's device; plain fp32 otherwise."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("TrainConfig.mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU.")
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(backend: DiffusionBackend, reward_fn: RewardFn, prompts: Sequence[str],
             sampler: SamplerConfig, train: TrainConfig, return_images: bool = False
             ) -> tuple[list[float], torch.Tensor | None]:
    """Reward of each held-out image, sampled from fixed latents (seeded by train.eval_seed).

    Every prompt is scored train.eval_latents times, each time from its own latent; the images
    follow `eval_entries(prompts, train)` (the prompt list repeated), so the first len(prompts) are
    the same whatever eval_latents is.

    Returns:
        (per-image rewards, images (N,3,H,W) on the CPU if return_images else None)
    """
    gen = torch.Generator().manual_seed(train.eval_seed)
    with _frozen_reward_stats(reward_fn):
        return _evaluate(backend, reward_fn, eval_entries(prompts, train), sampler, train, return_images, gen)


def eval_entries(prompts: Sequence[str], train: TrainConfig) -> list[str]:
    """The prompt of each image `evaluate` samples: the list, train.eval_latents times over."""
    return list(prompts) * train.eval_latents


@contextlib.contextmanager
def _frozen_reward_stats(reward_fn: RewardFn):
    """Evaluation must not move a reward's running statistics (e.g. a standardised mixture).

    Only a reward that has no statistics yet may take them from the first (step-0) evaluation
    batch: it cannot score anything otherwise, and the held-out batch at the starting weights is a
    fair first estimate of the reward's scale.
    """
    before = getattr(reward_fn, "update_stats", None)
    stats = getattr(reward_fn, "stats", None)
    if before is not None and getattr(stats, "batches", 1) > 0:
        reward_fn.update_stats = False
    try:
        yield
    finally:
        if before is not None:
            reward_fn.update_stats = before


def _evaluate(backend: DiffusionBackend, reward_fn: RewardFn, prompts: Sequence[str],
              sampler: SamplerConfig, train: TrainConfig, return_images: bool,
              gen: torch.Generator) -> tuple[list[float], torch.Tensor | None]:
    shape = backend.latent_shape(len(prompts), train.height, train.width)
    x_T = torch.randn(shape, generator=gen).to(backend.device)
    scores, images = [], []
    for i in range(0, len(prompts), train.eval_batch_size):
        chunk = list(prompts[i:i + train.eval_batch_size])
        with autocast_context(backend.device, train.mixed_precision):
            img = sample_images(backend, chunk, sampler, x_T[i:i + len(chunk)],
                                train.negative_prompt, grad_steps=0, generator=gen)
            scores += reward_fn(img.float(), chunk).float().tolist()
        if return_images:
            images.append(img.float().cpu())
    return scores, (torch.cat(images) if return_images else None)


def _loss(rewards: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    if train.loss == "maximize":
        return -rewards.mean()
    if train.loss == "target":
        return (train.reward_target - rewards).abs().mean()
    raise ValueError(f"TrainConfig.loss={train.loss!r} is not known; use maximize or target.")


def _validate_inputs(backend: DiffusionBackend, prompts: Sequence[str], eval_prompts: Sequence[str],
                     train: TrainConfig) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("no training prompts were given; give at least one prompt (one per line).")
    if not eval_prompts:
        raise ValueError("no evaluation prompts were given; give at least one held-out prompt.")
    backend.latent_shape(1, train.height, train.width)  # raises on a bad resolution


def train(backend: DiffusionBackend, reward_fn: RewardFn, prompts: Sequence[str],
          eval_prompts: Sequence[str], sampler: SamplerConfig, lora: LoraConfig, train: TrainConfig,
          out_dir: str | Path | None = None, lora_name: str = "alignprop_lora.safetensors",
          resume_from: str | Path | None = None, on_step: OnStep | None = None,
          should_stop: Callable[[], bool] | None = None, init_lora: LoraFile | None = None,
          state_dir: str | Path | None = None, overwrite: bool = False) -> TrainResult:
    """Fine-tune LoRA weights on `backend.lora_target` to maximise `reward_fn`.

    Args:
        backend: the model as callables (see `models.backend.DiffusionBackend`).
        reward_fn: differentiable reward, images in [0,1] -> (B,).
        prompts / eval_prompts: training prompts and held-out prompts for evaluation.
        sampler, lora, train: the three configs.
        out_dir: where the LoRA (and, with train.save_every, the training state) are written.
        lora_name: file name of the final LoRA inside out_dir (.safetensors is added if missing). A
            run that is stopped early or fails writes `<name>-partial.safetensors` instead, so it
            never replaces a finished LoRA of that name.
        resume_from: a train_state.pt to continue from exactly.
        on_step: called after every optimiser step (and evaluation) with (step, metrics).
        should_stop: polled at step boundaries; True ends the run and still saves the LoRA.
        init_lora: a LoRA file to continue from (its rank, alpha and modules must match `lora`).
        state_dir: where train_state.pt goes (default: out_dir).
        overwrite: replace an existing file at out_dir/lora_name; without it that is refused
            (FileExistsError) before any work.

    Returns:
        TrainResult with the LoRA path and the metric history.
    """
    # 0. everything that can be refused is refused before the first sample
    _validate_inputs(backend, prompts, eval_prompts, train)
    run_config = {"sampler": to_dict(sampler), "lora": to_dict(lora), "train": to_dict(train)}
    state = load_train_state(resume_from) if resume_from is not None else None
    out = Path(out_dir) if out_dir is not None else None
    state_out = Path(state_dir) if state_dir is not None else out
    if out is not None:
        lora_name = lora_file_name(lora_name, "lora_name")
        claim(check_writable(out) / lora_name, overwrite, "the LoRA file")
    if state_out is not None:
        check_writable(state_out, "the training-state folder")

    # 1. LoRA on the denoiser; only its parameters train (kept in fp32 by add_lora)
    params = add_lora(backend.lora_target, lora)
    if init_lora is not None:
        apply_lora_file(backend.lora_target, init_lora)
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    scaler = torch.amp.GradScaler(backend.device.type, enabled=train.mixed_precision == "fp16")
    gen = torch.Generator().manual_seed(train.seed)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    step = 0

    # 2. resume: restore every piece of state that influences what comes next
    if state is not None:
        if state.config and state.config.get("lora") != run_config["lora"]:
            raise ValueError(f"{resume_from} was trained with LoRA settings {state.config.get('lora')}, "
                             f"not {run_config['lora']}; resume with the same LoRA settings.")
        set_lora_state_dict(backend.lora_target, state.lora)
        optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        gen.set_state(state.generator)
        if state.reward_state and hasattr(reward_fn, "load_state_dict"):
            reward_fn.load_state_dict(state.reward_state)
        step, history, evals = state.step, state.history, state.evals

    def save_state() -> None:
        if state_out is not None:
            save_train_state(state_out / "train_state.pt", TrainState(
                step=step, lora=lora_state_dict(backend.lora_target), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else {}, generator=gen.get_state(),
                history=history, evals=evals, config=run_config,
                reward_state=reward_fn.state_dict() if hasattr(reward_fn, "state_dict") else {}))

    def save(name: str) -> Path | None:
        if out is None:
            return None
        meta = {"alignprop.step": str(step), "alignprop.base_model": backend.name,
                "alignprop.reward": train.reward, "alignprop.config": json.dumps(run_config)}
        return save_lora(out / name, backend.lora_target, lora, metadata=meta, arch=backend.arch)

    def run_eval() -> None:
        scores, _ = evaluate(backend, reward_fn, eval_prompts, sampler, train)
        evals.append({"step": step, "eval_reward": sum(scores) / len(scores)})
        if on_step is not None:
            on_step(step, dict(evals[-1]))

    if step == 0 and not evals:  # a run stopped during its step-0 evaluation has it already
        run_eval()
    stopped = False
    before_step = None  # random and reward state at the start of the step under way, if any
    try:
        while step < train.steps:
            if should_stop is not None and should_stop():
                stopped = True
                break
            before_step = _snapshot(gen, reward_fn)
            metrics = _optimizer_step(backend, reward_fn, prompts, sampler, train, params, optimizer,
                                      scaler, gen, step)
            before_step = None
            step += 1
            metrics["step"] = step
            history.append(metrics)
            if on_step is not None:
                on_step(step, dict(metrics))
            if (train.eval_every and step % train.eval_every == 0) or step == train.steps:
                run_eval()
            if train.save_every and step % train.save_every == 0:
                save_state()
                save(f"{Path(lora_name).stem}-step{step:05d}.safetensors")
    except KeyboardInterrupt:
        stopped = True
        _restore(before_step, gen, reward_fn)
        warnings.warn(f"training interrupted at step {step}; saving the LoRA trained so far as "
                      f"{partial_path(lora_name)}.")
    except BaseException as err:
        # keep what was trained (the LoRA only ever changes by a completed optimiser step) under the
        # partial name, then let the caller see the original error
        _restore(before_step, gen, reward_fn)
        warnings.warn(f"training stopped by {type(err).__name__} at step {step}; saving the LoRA "
                      f"trained so far as {partial_path(lora_name)}.")
        save(partial_path(lora_name).name)
        save_state()
        raise
    if stopped:
        save_state()
    path = save(partial_path(lora_name).name if stopped else lora_name)
    return TrainResult(lora_path=path, history=history, evals=evals, stopped_early=stopped)


def _snapshot(gen: torch.Generator, reward_fn: RewardFn) -> tuple[torch.Tensor, dict | None]:
    """What a step consumes besides the weights: the random stream and a reward's running statistics."""
    stats = reward_fn.state_dict() if hasattr(reward_fn, "state_dict") else None
    return gen.get_state(), (copy.deepcopy(stats) if stats is not None else None)


def _restore(snapshot: tuple[torch.Tensor, dict | None] | None, gen: torch.Generator,
             reward_fn: RewardFn) -> None:
    """Undo what an unfinished step consumed, so the saved state resumes exactly where it stopped.

    The LoRA and AdamW need nothing: they only change in the step's last call, `optimizer.step`.
    """
    if snapshot is None:
        return
    gen.set_state(snapshot[0])
    if snapshot[1] is not None:
        reward_fn.load_state_dict(snapshot[1])


def _optimizer_step(backend: DiffusionBackend, reward_fn: RewardFn, prompts: Sequence[str],
                    sampler: SamplerConfig, train: TrainConfig, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    gen: torch.Generator, step: int) -> dict[str, Any]:
    """grad_accum micro-batches of sample -> decode -> reward -> backward, then one AdamW step."""
    optimizer.zero_grad(set_to_none=True)
    lr = learning_rate(train, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    rewards, losses, ks = [], [], []
    for _ in range(train.grad_accum):
        idx = torch.randint(len(prompts), (train.batch_size,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        shape = backend.latent_shape(train.batch_size, train.height, train.width)
        x_T = torch.randn(shape, generator=gen).to(backend.device)  # (B, C, H/f, W/f)
        k = draw_truncation(sampler, gen)  # once per batch: the whole window is contiguous
        with autocast_context(backend.device, train.mixed_precision):
            images = sample_images(backend, batch_prompts, sampler, x_T, train.negative_prompt,
                                   grad_steps=k, generator=gen)
            scored = augment_for_reward(images.float(), train.reward_augment, gen)
            r = reward_fn(scored, batch_prompts).float()  # (B,)
        if not torch.isfinite(r).all():
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"the reward returned NaN/Inf for prompts {batch_prompts}; this optimiser "
                          "step is skipped and the LoRA is left unchanged.")
            return {"reward": math.nan, "loss": math.nan, "k": k, "grad_norm": math.nan, "skipped": True,
                    "lr": lr}
        loss = _loss(r, train)
        scaler.scale(loss / train.grad_accum).backward()
        rewards += r.detach().tolist()
        losses.append(loss.item())
        ks.append(k)
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])
                                         ) if grads else torch.zeros(())
    if train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return {"reward": sum(rewards) / len(rewards), "loss": sum(losses) / len(losses),
            "k": ks[0] if len(ks) == 1 else ks, "grad_norm": float(grad_norm), "skipped": False, "lr": lr}
