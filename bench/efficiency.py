"""Item 4, sample efficiency against RL: held-out reward versus reward queries (images scored) for
AlignProp (the library's `trainer.train`) and DDPO (`bench.ddpo`), same model, reward, prompts, T,
guidance and LoRA, each starting from the same weights. The defaults are the demo's job (the toy world,
its count reward, T=10, CFG 4, LoRA rank 8; AlignProp's K drawn from 3-6, batch 4, lr 1.5e-3).

Both are evaluated by `alignprop_core.trainer.evaluate` with one common evaluator: deterministic DDIM
(eta 0), the same T and guidance, fixed latents, every held-out prompt. Evaluation images are not
counted as queries. One AlignProp run is noisy (the held-out reward of a single seed can fall while
another rises), so AlignProp runs with several training seeds and is judged by the median of their
curves; DDPO, 1,024 queries a run, runs once. Target: AlignProp's median curve reaches DDPO's reward at
`ddpo_queries` (1,024) with <= 1/25 of them.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

from alignprop_core.cli import demo_preset
from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.denoiser import diffusers_backend
from alignprop_core.lora import add_lora
from alignprop_core.prompts import shipped_prompts
from alignprop_core.rewards import make_reward
from alignprop_core.trainer import evaluate, train
from bench.ddpo import DDPOConfig, ddpo_epoch
from bench.models import build_model, default_px

TARGET_FACTOR = 25
DEMO_SAMPLER, DEMO_LORA, DEMO_TRAIN = demo_preset()  # the spec's defaults follow the demo


@dataclass
class EfficiencySpec:
    model: str = "tiny"
    reward: str = "color_target"
    prompts: str = "auto"  # shipped list pair: animals | toy | auto (toy for toy_* rewards)
    steps: int = DEMO_SAMPLER.steps
    guidance: float = DEMO_SAMPLER.guidance_scale
    k_min: int = DEMO_SAMPLER.k_min  # AlignProp's truncation: K drawn uniformly from [k_min, k_max]
    k_max: int = DEMO_SAMPLER.k_max
    lora_rank: int = DEMO_LORA.rank  # alpha = rank (scale 1), for both methods
    px: int = 0
    seed: int = 0  # DDPO's seed (each AlignProp run takes one of alignprop_seeds instead)
    alignprop_seeds: tuple[int, ...] = (0, 1, 2, 3)  # training and LoRA-init seeds; the median is judged
    alignprop_queries: int = 256
    alignprop_batch: int = DEMO_TRAIN.batch_size
    alignprop_lr: float = DEMO_TRAIN.lr
    alignprop_warmup: int = DEMO_TRAIN.lr_warmup_steps  # optimiser steps of linear lr warm-up
    alignprop_schedule: str = DEMO_TRAIN.lr_schedule  # after warm-up: constant | linear | cosine
    alignprop_eval_every: int = 4  # optimiser steps
    ddpo_queries: int = 1024
    ddpo_lr: float = 3e-3  # TRL's default 3e-4 left the toy world flat; 1e-2 collapsed by 1,024
    ddpo_eval_every: int = 128  # queries
    eval_prompts: int = 0  # 0: every held-out prompt
    workers: int = 1  # processes running the AlignProp seeds and DDPO side by side
    threads: int = 1  # torch threads per worker

    @property
    def size(self) -> int:
        return self.px or default_px(self.model)


def prompt_lists(spec: EfficiencySpec) -> tuple[list[str], list[str]]:
    name = spec.prompts
    if name == "auto":
        name = "toy" if spec.reward.startswith("toy") else "animals"
    train_p = shipped_prompts(f"{name}_train" if name == "toy" else name)
    eval_p = shipped_prompts(f"{name}_eval")
    return train_p, eval_p[:spec.eval_prompts] if spec.eval_prompts else eval_p


def _eval_configs(spec: EfficiencySpec) -> tuple[SamplerConfig, TrainConfig]:
    sampler = SamplerConfig(steps=spec.steps, guidance_scale=spec.guidance, truncation="uniform",
                            k_min=spec.k_min, k_max=spec.k_max)
    tcfg = TrainConfig(reward=spec.reward, width=spec.size, height=spec.size, seed=spec.seed,
                       eval_batch_size=12, batch_size=spec.alignprop_batch,
                       lr=spec.alignprop_lr, lr_warmup_steps=spec.alignprop_warmup,
                       lr_schedule=spec.alignprop_schedule, steps=max(1, spec.alignprop_queries // spec.alignprop_batch),
                       eval_every=spec.alignprop_eval_every)
    return sampler, tcfg


def _lora_config(spec: EfficiencySpec) -> LoraConfig:
    return LoraConfig(rank=spec.lora_rank, alpha=float(spec.lora_rank), init_seed=spec.seed)


def run_alignprop(spec: EfficiencySpec) -> list[dict]:
    torch.manual_seed(spec.seed)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.seed), name=spec.model)
    sampler, tcfg = _eval_configs(spec)
    t0 = time.perf_counter()
    result = train(backend, make_reward(spec.reward), train_p, eval_p, sampler,
                   _lora_config(spec), tcfg)
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
    params = add_lora(backend.lora_target, _lora_config(spec))
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


def median_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise median held-out reward of runs evaluated at the same query counts."""
    return [{"queries": points[0]["queries"], "reward": statistics.median(p["reward"] for p in points),
             "wall_s": statistics.median(p["wall_s"] for p in points)} for points in zip(*curves)]


def _job(args: tuple[str, EfficiencySpec]) -> list[dict]:
    kind, spec = args
    torch.set_num_threads(spec.threads)
    return run_alignprop(spec) if kind == "alignprop" else run_ddpo(spec)


def run(spec: EfficiencySpec) -> dict:
    jobs = [("ddpo", spec)] + [("alignprop", replace(spec, seed=s)) for s in spec.alignprop_seeds]
    if spec.workers > 1:  # spawn: a forked child would inherit the parent's OpenMP state
        with ProcessPoolExecutor(spec.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, jobs))
    else:
        done = [_job(j) for j in jobs]
    dd, runs = done[0], done[1:]
    ap = median_curve(runs)
    for seed, curve in zip(spec.alignprop_seeds, runs):
        print(f"[efficiency] alignprop seed {seed}, {curve[-1]['queries']} queries: held-out "
              f"{curve[-1]['reward']:.4f}", flush=True)
    level, best = dd[-1]["reward"], max(c["reward"] for c in dd)
    needed = queries_to_reach(ap, level)
    ddpo_improved = level > dd[0]["reward"]
    factor = (spec.ddpo_queries / needed) if needed else None
    met = bool(ddpo_improved and needed is not None and needed * TARGET_FACTOR <= spec.ddpo_queries)
    return {"spec": spec.__dict__, "alignprop": ap, "alignprop_runs": runs, "ddpo": dd, "ddpo_final": level,
            "ddpo_best": best, "alignprop_queries_needed": needed,
            "alignprop_queries_per_seed": [queries_to_reach(c, level) for c in runs],
            "alignprop_queries_to_ddpo_best": queries_to_reach(ap, best),
            "factor": factor, "ddpo_improved": ddpo_improved, "target_factor": TARGET_FACTOR, "met": met}
