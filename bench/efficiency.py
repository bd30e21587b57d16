"""Item 4, sample efficiency against RL: held-out reward versus reward queries (images scored) for
AlignProp (the library's `trainer.train`) and DDPO (`bench.ddpo`), same model, reward, prompts, T,
guidance and LoRA, each starting from the same weights. The defaults are the demo's job (the toy world,
its count reward, T=10, CFG 4, LoRA rank 8; AlignProp's K drawn from 3-6, batch 4, lr 1.5e-3).

Both are evaluated by `alignprop_core.training.evaluate.evaluate` with one common evaluator: deterministic DDIM
(eta 0), the same T and guidance, fixed latents, every held-out prompt with `eval_latents` images each
(one image flipping its count moves a 36-image mean by 0.1-0.4, as much as DDPO gains in all).
Evaluation images are not counted as queries. One AlignProp run is noisy (the held-out reward of a
single seed can fall while another rises), so AlignProp runs with several training seeds and is judged
by the median of their curves. DDPO, 1,024 queries a run, runs every seed of `ddpo_seeds` for each
learning rate of `ddpo_lrs` and is judged by the median of its seeds too; the learning rate whose
median has the highest held-out reward at `ddpo_queries` is the baseline: the strongest DDPO of the
sweep, chosen on the very metric it is judged by (a choice in DDPO's favour).
Target: AlignProp's median curve reaches that DDPO's reward at `ddpo_queries` (1,024) with <= 1/25 of
them.

The held-out prompts are (count, colour, shape) combinations that no training prompt has. Each
evaluation also scores a fixed subset of the training prompts (`train_eval_prompts`, one image each),
reported beside the held-out reward: how each method does on the prompts it trains on.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from alignprop_core.cli import demo_preset
from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import diffusers_backend
from alignprop_core.lora import add_lora
from alignprop_core.files.prompts import shipped_prompts
from alignprop_core.rewards import make_reward
from alignprop_core.training.evaluate import evaluate
from alignprop_core.training.trainer import train
from bench.ddpo import DDPOConfig, ddpo_epoch
from bench.models import build_model, default_px

TARGET_FACTOR = 25
DEMO_SAMPLER, DEMO_LORA, DEMO_TRAIN = demo_preset()  # the spec's defaults follow the demo


@dataclass
class EfficiencySpec:
    model: str = "tiny"
    reward: str = "color_target"
    reward_args: dict = field(default_factory=dict)  # keyword arguments of the reward factory
    prompts: str = "auto"  # shipped list pair: animals | toy | auto (toy for the toy world or toy_* rewards)
    steps: int = DEMO_SAMPLER.steps
    guidance: float = DEMO_SAMPLER.guidance_scale
    k_min: int = DEMO_SAMPLER.k_min  # AlignProp's truncation: K drawn uniformly from [k_min, k_max]
    k_max: int = DEMO_SAMPLER.k_max
    lora_rank: int = DEMO_LORA.rank  # alpha = rank (scale 1), for both methods
    lora_targets: tuple[str, ...] = DEMO_LORA.target_modules  # LoraConfig.target_modules, both methods
    px: int = 0
    model_seed: int = 0  # weights of a builtin random model (tiny | small): one model for every run
    seed: int = 0  # the seed of a single run (run_alignprop, run_ddpo); run() sets it from the tuples below
    alignprop_seeds: tuple[int, ...] = (0, 1, 2, 3)  # training and LoRA-init seeds; the median is judged
    alignprop_queries: int = 256
    alignprop_batch: int = DEMO_TRAIN.batch_size
    alignprop_lr: float = DEMO_TRAIN.lr
    alignprop_warmup: int = DEMO_TRAIN.lr_warmup_steps  # optimiser steps of linear lr warm-up
    alignprop_schedule: str = DEMO_TRAIN.lr_schedule  # after warm-up: constant | linear | cosine
    alignprop_reward_augment: str = DEMO_TRAIN.reward_augment  # TrainConfig.reward_augment
    alignprop_eval_every: int = 2  # optimiser steps (2 x batch 4: a point every 8 queries)
    ddpo_queries: int = 1024
    ddpo_lrs: tuple[float, ...] = (3e-3,)  # the strongest median at ddpo_queries is the baseline
    ddpo_seeds: tuple[int, ...] = (0,)  # one DDPO run per seed and lr; each lr is judged by its median
    ddpo_eval_every: int = 128  # queries
    eval_prompts: int = 0  # 0: every held-out prompt
    eval_latents: int = 2  # images per held-out prompt (each from its own fixed latent)
    train_eval_prompts: int = 36  # training prompts scored beside the held-out ones (0: none)
    workers: int = 1  # processes running the AlignProp seeds and DDPO side by side
    threads: int = 1  # torch threads per worker

    @property
    def size(self) -> int:
        return self.px or default_px(self.model)


def prompt_lists(spec: EfficiencySpec) -> tuple[list[str], list[str]]:
    name = spec.prompts
    if name == "auto":  # the toy world's own lists for its model or its rewards
        name = "toy" if spec.reward.startswith("toy") or Path(spec.model).name == "toy_world" else "animals"
    train_p = shipped_prompts(f"{name}_train" if name == "toy" else name)
    eval_p = shipped_prompts(f"{name}_eval")
    eval_p = eval_p[:spec.eval_prompts] if spec.eval_prompts else eval_p
    return train_p, eval_p  # each scored spec.eval_latents times (TrainConfig.eval_latents)


def train_subset(train_p: list[str], n: int) -> list[str]:
    """n training prompts spread evenly over the list (every colour, count and background of the
    toy world's ordered list), scored beside the held-out ones; [] when n is 0."""
    if n <= 0:
        return []
    stride = max(1, len(train_p) // n)
    return train_p[::stride][:n]


def _scorer(backend, reward_fn, sampler: SamplerConfig, tcfg: TrainConfig, eval_p: list[str],
            train_eval_p: list[str]):
    """() -> {"reward": held-out mean[, "train_reward": training-subset mean]} at the current weights."""
    def score() -> dict:
        out = {}
        # the held-out prompts with tcfg.eval_latents images each, the training subset with one
        for key, prompts, cfg in (("reward", eval_p, tcfg),
                                  ("train_reward", train_eval_p, replace(tcfg, eval_latents=1))):
            if prompts:
                scores, _ = evaluate(backend, reward_fn, prompts, sampler, cfg)
                out[key] = sum(scores) / len(scores)
        return out
    return score


def _eval_configs(spec: EfficiencySpec) -> tuple[SamplerConfig, TrainConfig]:
    sampler = SamplerConfig(steps=spec.steps, guidance_scale=spec.guidance, truncation="uniform",
                            k_min=spec.k_min, k_max=spec.k_max)
    tcfg = TrainConfig(reward=spec.reward, width=spec.size, height=spec.size, seed=spec.seed,
                       eval_latents=spec.eval_latents, eval_batch_size=12, batch_size=spec.alignprop_batch,
                       lr=spec.alignprop_lr, lr_warmup_steps=spec.alignprop_warmup,
                       lr_schedule=spec.alignprop_schedule, reward_augment=spec.alignprop_reward_augment,
                       steps=max(1, spec.alignprop_queries // spec.alignprop_batch),
                       eval_every=spec.alignprop_eval_every)
    return sampler, tcfg


def _lora_config(spec: EfficiencySpec) -> LoraConfig:
    return LoraConfig(rank=spec.lora_rank, alpha=float(spec.lora_rank), init_seed=spec.seed,
                      target_modules=spec.lora_targets)


def run_alignprop(spec: EfficiencySpec) -> list[dict]:
    torch.manual_seed(spec.seed)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.model_seed), name=spec.model)
    sampler, tcfg = _eval_configs(spec)
    reward_fn = make_reward(spec.reward, **spec.reward_args)
    # train() scores the held-out prompts itself; this adds the training subset at the same steps
    on_train = _scorer(backend, reward_fn, sampler, tcfg, [], train_subset(train_p, spec.train_eval_prompts))
    on_train_at: dict[int, dict] = {}

    def on_step(step: int, metrics: dict) -> None:  # called after each evaluation with its result
        if "eval_reward" in metrics:
            on_train_at[step] = on_train()

    t0 = time.perf_counter()
    result = train(backend, reward_fn, train_p, eval_p, sampler, _lora_config(spec), tcfg, on_step=on_step)
    wall = time.perf_counter() - t0
    return [{"queries": e["step"] * spec.alignprop_batch, "reward": e["eval_reward"], "wall_s": wall}
            | on_train_at[e["step"]] for e in result.evals]


def run_ddpo(spec: EfficiencySpec, lr: float, cfg: DDPOConfig | None = None) -> list[dict]:
    """One DDPO run at learning rate `lr`: its evaluation curve."""
    torch.manual_seed(spec.seed)
    cfg = cfg or DDPOConfig(steps=spec.steps, guidance=spec.guidance, lr=lr)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.model_seed), name=spec.model)
    reward_fn = make_reward(spec.reward, **spec.reward_args)
    sampler, tcfg = _eval_configs(spec)
    params = add_lora(backend.lora_target, _lora_config(spec))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(spec.seed)

    score = _scorer(backend, reward_fn, sampler, tcfg, eval_p, train_subset(train_p, spec.train_eval_prompts))

    def point(q: int) -> dict:
        return {"queries": q} | score()

    curve, queries, t0 = [point(0)], 0, time.perf_counter()
    while queries < spec.ddpo_queries:
        info = ddpo_epoch(backend, reward_fn, train_p, cfg, spec.size, params, optimizer, gen)
        queries += info["queries"]
        if queries % spec.ddpo_eval_every == 0 or queries >= spec.ddpo_queries:
            curve.append(point(queries) | {"clip_fraction": info["clip_fraction"]})
            print(f"[efficiency] ddpo lr {cfg.lr:g}, seed {spec.seed}, {queries} queries: held-out "
                  f"{curve[-1]['reward']:.4f}", flush=True)
    for c in curve:
        c["wall_s"] = time.perf_counter() - t0
    return curve


def queries_to_reach(curve: list[dict], level: float, key: str = "reward") -> int | None:
    """First evaluated query count whose `key` (held-out reward by default) is >= level (None: never
    within the curve)."""
    for c in curve:
        if c[key] >= level:
            return c["queries"]
    return None


def median_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise median of every metric (held-out and training-prompt reward, wall clock) of runs
    evaluated at the same query counts."""
    return [{"queries": points[0]["queries"]}
            | {k: statistics.median(p[k] for p in points) for k in points[0] if k != "queries"}
            for points in zip(*curves)]


def _crossing(ap: list[dict], runs: list[list[dict]], dd: list[dict], ddpo_queries: int,
              key: str) -> dict:
    """How many queries AlignProp's median curve (and each seed) needs to reach DDPO's `key` at its
    last evaluation, and the factor that saves."""
    level, best = dd[-1][key], max(c[key] for c in dd)
    needed = queries_to_reach(ap, level, key)
    improved = level > dd[0][key]
    return {"ddpo_final": level, "ddpo_best": best, "ddpo_improved": improved,
            "alignprop_queries_needed": needed,
            "alignprop_queries_per_seed": [queries_to_reach(c, level, key) for c in runs],
            "alignprop_queries_to_ddpo_best": queries_to_reach(ap, best, key),
            "factor": (ddpo_queries / needed) if needed else None,
            "met": bool(improved and needed is not None and needed * TARGET_FACTOR <= ddpo_queries)}


def strongest_ddpo(sweep: list[dict]) -> dict:
    """The entry of a DDPO learning-rate sweep ({"lr", "curve": the median of its seeds}) with the
    highest held-out reward at its last evaluation (the query budget); the earliest lr on a tie."""
    return max(sweep, key=lambda run: run["curve"][-1]["reward"])


def _job(args: tuple[str, EfficiencySpec, float | None]) -> list[dict]:
    kind, spec, lr = args
    torch.set_num_threads(spec.threads)
    return run_alignprop(spec) if kind == "alignprop" else run_ddpo(spec, lr)


def run(spec: EfficiencySpec) -> dict:
    for name in ("ddpo_lrs", "ddpo_seeds", "alignprop_seeds"):
        if not getattr(spec, name):
            raise ValueError(f"EfficiencySpec.{name} is empty; give at least one value.")
    jobs = ([("ddpo", replace(spec, seed=s), lr) for lr in spec.ddpo_lrs for s in spec.ddpo_seeds]
            + [("alignprop", replace(spec, seed=s), None) for s in spec.alignprop_seeds])
    if spec.workers > 1:  # spawn: a forked child would inherit the parent's OpenMP state
        with ProcessPoolExecutor(spec.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, jobs))
    else:
        done = [_job(j) for j in jobs]
    per_lr, n = len(spec.ddpo_seeds), len(spec.ddpo_lrs) * len(spec.ddpo_seeds)
    by_lr = [done[i:i + per_lr] for i in range(0, n, per_lr)]  # jobs run lr by lr, every seed of each
    sweep = [{"lr": lr, "curve": median_curve(lr_runs), "runs": lr_runs}
             for lr, lr_runs in zip(spec.ddpo_lrs, by_lr)]
    baseline = strongest_ddpo(sweep)
    dd, runs = baseline["curve"], done[n:]
    ap = median_curve(runs)
    for seed, curve in zip(spec.alignprop_seeds, runs):
        print(f"[efficiency] alignprop seed {seed}, {curve[-1]['queries']} queries: held-out "
              f"{curve[-1]['reward']:.4f}", flush=True)
    held_out = _crossing(ap, runs, dd, spec.ddpo_queries, "reward")
    train_prompts = (_crossing(ap, runs, dd, spec.ddpo_queries, "train_reward")
                     if "train_reward" in dd[0] else None)
    return {"spec": spec.__dict__, "alignprop": ap, "alignprop_runs": runs, "ddpo": dd,
            "ddpo_runs": baseline["runs"], "ddpo_lr": baseline["lr"], "ddpo_sweep": sweep} | held_out | {
        "target_factor": TARGET_FACTOR, "train_prompts": train_prompts}
