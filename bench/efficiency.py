"""Item 4, sample efficiency against RL: held-out reward versus reward queries (images scored) for
AlignProp (the library's `trainer.train`) and DDPO (`bench.ddpo`), same model, reward, prompts, T,
guidance and LoRA, each starting from the same weights.

Both are evaluated by `alignprop_core.trainer.evaluate` with one common evaluator: deterministic DDIM
(eta 0), the same T and guidance, fixed latents, held-out prompts. Evaluation images are not counted
as queries. Target: AlignProp reaches DDPO's reward at `ddpo_queries` (1,024) with <= 1/25 of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.denoiser import diffusers_backend
from alignprop_core.lora import add_lora
from alignprop_core.prompts import shipped_prompts
from alignprop_core.rewards import make_reward
from alignprop_core.trainer import evaluate, train
from bench.ddpo import DDPOConfig, ddpo_epoch
from bench.models import build_model, default_px

TARGET_FACTOR = 25


@dataclass
class EfficiencySpec:
    model: str = "tiny"
    reward: str = "color_target"
    prompts: str = "auto"  # shipped list pair: animals | toy | auto (toy for toy_* rewards)
    steps: int = 20
    guidance: float = 7.5
    px: int = 0
    seed: int = 0
    alignprop_queries: int = 64
    alignprop_batch: int = 2
    alignprop_lr: float = 1e-3
    alignprop_eval_every: int = 2  # optimiser steps
    ddpo_queries: int = 1024
    ddpo_lr: float = 3e-4  # TRL's DDPOConfig default
    ddpo_eval_every: int = 128  # queries
    eval_prompts: int = 8

    @property
    def size(self) -> int:
        return self.px or default_px(self.model)


def prompt_lists(spec: EfficiencySpec) -> tuple[list[str], list[str]]:
    name = spec.prompts
    if name == "auto":
        name = "toy" if spec.reward.startswith("toy") else "animals"
    train_p = shipped_prompts(f"{name}_train" if name == "toy" else name)
    eval_p = shipped_prompts(f"{name}_eval")
    return train_p, eval_p[:spec.eval_prompts]


def _eval_configs(spec: EfficiencySpec) -> tuple[SamplerConfig, TrainConfig]:
    sampler = SamplerConfig(steps=spec.steps, guidance_scale=spec.guidance, k=1)
    tcfg = TrainConfig(reward=spec.reward, width=spec.size, height=spec.size, seed=spec.seed,
                       eval_batch_size=spec.eval_prompts, batch_size=spec.alignprop_batch,
                       lr=spec.alignprop_lr, steps=max(1, spec.alignprop_queries // spec.alignprop_batch),
                       eval_every=spec.alignprop_eval_every)
    return sampler, tcfg


def run_alignprop(spec: EfficiencySpec) -> list[dict]:
    torch.manual_seed(spec.seed)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.seed), name=spec.model)
    sampler, tcfg = _eval_configs(spec)
    t0 = time.perf_counter()
    result = train(backend, make_reward(spec.reward), train_p, eval_p, sampler,
                   LoraConfig(init_seed=spec.seed), tcfg)
    wall = time.perf_counter() - t0
    return [{"queries": e["step"] * spec.alignprop_batch, "reward": e["eval_reward"], "wall_s": wall}
            for e in result.evals]


def run_ddpo(spec: EfficiencySpec, cfg: DDPOConfig | None = None) -> list[dict]:
    torch.manual_seed(spec.seed)
    cfg = cfg or DDPOConfig(steps=spec.steps, guidance=spec.guidance, lr=spec.ddpo_lr)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.seed), name=spec.model)
    reward_fn = make_reward(spec.reward)
    sampler, tcfg = _eval_configs(spec)
    params = add_lora(backend.lora_target, LoraConfig(init_seed=spec.seed))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(spec.seed)

    def point(q: int) -> dict:
        scores, _ = evaluate(backend, reward_fn, eval_p, sampler, tcfg)
        return {"queries": q, "reward": sum(scores) / len(scores)}

    curve, queries, t0 = [point(0)], 0, time.perf_counter()
    while queries < spec.ddpo_queries:
        info = ddpo_epoch(backend, reward_fn, train_p, cfg, spec.size, params, optimizer, gen)
        queries += info["queries"]
        if queries % spec.ddpo_eval_every == 0 or queries >= spec.ddpo_queries:
            curve.append(point(queries) | {"clip_fraction": info["clip_fraction"]})
            print(f"[efficiency] ddpo {queries} queries: held-out {curve[-1]['reward']:.4f}", flush=True)
    for c in curve:
        c["wall_s"] = time.perf_counter() - t0
    return curve


def queries_to_reach(curve: list[dict], level: float) -> int | None:
    """First evaluated query count whose held-out reward is >= level (None: never within the curve)."""
    for c in curve:
        if c["reward"] >= level:
            return c["queries"]
    return None


def run(spec: EfficiencySpec) -> dict:
    ap = run_alignprop(spec)
    print(f"[efficiency] alignprop {ap[-1]['queries']} queries: held-out {ap[-1]['reward']:.4f}", flush=True)
    dd = run_ddpo(spec)
    level = dd[-1]["reward"]
    needed = queries_to_reach(ap, level)
    ddpo_improved = level > dd[0]["reward"]
    factor = (spec.ddpo_queries / needed) if needed else None
    met = bool(ddpo_improved and needed is not None and needed * TARGET_FACTOR <= spec.ddpo_queries)
    return {"spec": spec.__dict__, "alignprop": ap, "ddpo": dd, "ddpo_final": level,
            "alignprop_queries_needed": needed, "factor": factor, "ddpo_improved": ddpo_improved,
            "target_factor": TARGET_FACTOR, "met": met}
