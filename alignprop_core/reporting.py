"""One whole run from the command line: load the model, train, and write every artefact.

Artefacts in the output folder: the LoRA, with `TrainConfig.keep_best` the LoRA of the best
evaluation (<name>-best.safetensors), metrics.csv / metrics.json, reward_curve.png, and
before_after.png (held-out prompts from fixed latents, without and with the LoRA).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import LoraConfig, MemoryConfig, SamplerConfig, TrainConfig, to_dict
from .lora import set_lora_scale
from .models.loading import load_backend
from .parallel.world import World, single_process
from .plots import plot_reward_curve, save_before_after_grid
from .rewards import Reward
from .run_log import write_metrics
from .training.evaluate import eval_entries, evaluate
from .training.run import build_judges, check_trainable
from .training.trainer import train

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _progress(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="AlignProp", unit="step", dynamic_ncols=True)
    latest: dict[str, float] = {}

    def on_step(step: int, metrics: dict[str, Any]) -> None:
        if "eval_reward" in metrics:
            latest["eval"] = metrics["eval_reward"]
            latest.update(metrics.get("judges") or {})
        else:
            latest["reward"] = metrics["reward"]
            bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4f}" for k, v in latest.items()})

    return bar, on_step


def _rank0_settings(world: World, sampler: SamplerConfig, cfg: TrainConfig) -> tuple[SamplerConfig, TrainConfig]:
    """Rank 0's planned settings (`Plan.apply`'s fields) on every rank (only rank 0 probes)."""
    if world.size == 1:
        return sampler, cfg
    mine = [cfg.batch_size, cfg.grad_accum, sampler.checkpoint_unet, sampler.checkpoint_vae, cfg.offload_reward]
    batch, accum, unet, vae, offload = world.sum([float(v) if world.writes else 0.0 for v in mine],
                                                 "the memory plan")
    return (dataclasses.replace(sampler, checkpoint_unet=bool(unet), checkpoint_vae=bool(vae)),
            dataclasses.replace(cfg, batch_size=int(batch), grad_accum=int(accum), offload_reward=bool(offload)))


def run_and_report(model_dir: Path, reward: Reward, prompts: Sequence[str],
                   eval_prompts: Sequence[str], sampler: SamplerConfig, lora: LoraConfig,
                   cfg: TrainConfig, out_dir: Path, lora_name: str, resume_from: Path | None,
                   device: torch.device, overwrite: bool = False,
                   judges: Sequence[Reward] | None = None, memory: MemoryConfig | None = None,
                   world: World | None = None) -> dict[str, Any] | None:
    """Train on the diffusers model in `model_dir` and write all artefacts into `out_dir`.

    `judges` score every evaluation beside the reward (default: built from cfg.judges). With a
    `memory` budget the planner probes the model once loaded, prints its plan to stderr and trains
    with the batch split and checkpointing it chose. On a rank of a data-parallel run (`world`),
    rank 0 alone plans (the others take its settings), samples the before/after grid, writes and
    returns the summary; the other ranks train and return None."""
    world = world or single_process()
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise ValueError("TrainConfig.mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU.")
    check_trainable(reward)  # before the model is loaded
    named, cfg = build_judges(judges, cfg)
    cfg = dataclasses.replace(cfg, reward=reward.spec.text())  # the reward as built, with its arguments
    backend = load_backend(model_dir, device=device, dtype=WEIGHT_DTYPES[cfg.mixed_precision],
                           name=Path(model_dir).name)
    planned = {}
    if memory is not None and memory.enabled:
        from .planning import GB, plan_memory

        if world.writes:
            plan = plan_memory(backend, reward, prompts, sampler, lora, cfg, memory)
            print(plan.describe(), file=sys.stderr)
            sampler, cfg = plan.apply(sampler, cfg)
            planned = {"memory_plan": plan.chosen.setting.label(), "memory_estimate_gb": plan.chosen.peak / GB}
        sampler, cfg = _rank0_settings(world, sampler, cfg)
    # A reward with a report (e.g. toy_count's accuracy) is reported on every held-out prompt;
    # otherwise only the grid's prompts are sampled again.
    shown = list(eval_prompts) if reward.has_report else list(eval_prompts)[:8]
    grid_prompts = shown[:24]  # two lines of 12 (toy world: every count six times)
    if not world.writes:
        train(backend, reward, prompts, eval_prompts, sampler, lora, cfg, out_dir=out_dir, lora_name=lora_name,
              resume_from=resume_from, overwrite=overwrite, judges=list(named.values()), world=world)
        return None
    before_scores, before = evaluate(backend, reward, shown, sampler, cfg, return_images=True)

    bar, on_step = _progress(cfg.steps)
    try:
        result = train(backend, reward, prompts, eval_prompts, sampler, lora, cfg, out_dir=out_dir,
                       lora_name=lora_name, resume_from=resume_from, on_step=on_step, overwrite=overwrite,
                       judges=list(named.values()), world=world)
    finally:
        bar.close()

    set_lora_scale(backend.lora_target, 1.0)
    after_scores, after = evaluate(backend, reward, shown, sampler, cfg, return_images=True)
    config = {"sampler": to_dict(sampler), "lora": to_dict(lora), "train": to_dict(cfg),
              "model": str(model_dir)}
    csv_path, json_path = write_metrics(out_dir, result.history, result.evals, config)
    curve = plot_reward_curve(result.history, result.evals, Path(out_dir) / "reward_curve.png",
                              title=f"AlignProp: {reward.spec.label}")
    n = len(grid_prompts)
    grid = save_before_after_grid(before[:n], after[:n], grid_prompts, before_scores[:n],
                                  after_scores[:n], Path(out_dir) / "before_after.png", columns=12)
    evals = result.evals
    scored = eval_entries(shown, cfg)  # the prompt of each image (eval_latents per prompt)
    extra = {} if not reward.has_report else {"held_out_report_start": reward.report(before, scored),
                                              "held_out_report_end": reward.report(after, scored)}
    return {**extra, **planned, **held_out_summary(evals), "reward": reward.spec.text(),
        "lora": str(result.lora_path), "metrics_csv": str(csv_path), "metrics_json": str(json_path),
        "reward_curve": str(curve), "before_after": str(grid),
        "held_out_reward_start": evals[0]["eval_reward"] if evals else None,
        "held_out_reward_end": evals[-1]["eval_reward"] if evals else None,
        "steps": result.history[-1]["step"] if result.history else 0,
        "stopped_early": result.stopped_early,
        "best_lora": str(result.best_path) if result.best_path is not None else None,
        "best_step": result.best_step, "early_stopped": result.early_stopped,
    }


def held_out_summary(evals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The judges (name -> mean score) and the diversity at the first and the last evaluation."""
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    return {"held_out_judges_start": dict(first.get("judges") or {}),
            "held_out_judges_end": dict(last.get("judges") or {}),
            "diversity_start": first.get("diversity"), "diversity_end": last.get("diversity")}
