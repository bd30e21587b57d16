"""Item 6, gradient estimators: DRaFT-LV (n re-noised copies of the last step) against truncated
backpropagation with K = 1, same model, reward, prompts, T, guidance, LoRA, batch and learning rate.

Both train through the library's `TrainRun`; only `SamplerConfig.estimator` differs. A DRaFT-LV step
scores (n + 1) x batch images, so the two are compared per reward query and per second of training
(the optimiser steps only; evaluations are not timed). Each seed runs both estimators one after the
other in the same process, so a busy machine slows both alike; the median over seeds is judged.
Target: DRaFT-LV's median held-out reward reaches truncated K=1's median at `budget` queries in at
most half of truncated K=1's training wall-clock to that point. Where truncated K=1 ends at or below
the untrained start, there is nothing to reach and no verdict (`met` None).
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import diffusers_backend
from alignprop_core.rewards import make_reward
from alignprop_core.training.run import TrainRun
from bench.efficiency import prompt_lists
from bench.models import build_model, default_px

TARGET_WALL_FRACTION = 0.5
ESTIMATORS = ("truncated", "draft_lv")


@dataclass
class EstimatorSpec:
    model: str = "alignprop_core/data/toy_world"
    reward: str = "toy_count"
    prompts: str = "auto"  # as in item 4 (bench.efficiency.prompt_lists)
    steps: int = 10  # T
    guidance: float = 4.0
    lora_rank: int = 8
    batch: int = 4
    lr: float = 1.5e-3
    lv_samples: int = 2  # DRaFT-LV's n
    budget: int = 512  # truncated K=1's reward queries; DRaFT-LV runs as many optimiser steps
    eval_every: int = 16  # optimiser steps between evaluations (both estimators)
    eval_latents: int = 1  # 36 held-out images per evaluation; the median over seeds steadies it
    seeds: tuple[int, ...] = tuple(range(8))
    model_seed: int = 0
    workers: int = 1
    threads: int = 1
    px: int = 0
    eval_prompts: int = 0  # bench.efficiency.prompt_lists: 0 = every held-out prompt

    @property
    def size(self) -> int:
        return self.px or default_px(self.model)


def _configs(spec: EstimatorSpec, estimator: str, seed: int) -> tuple[SamplerConfig, LoraConfig, TrainConfig]:
    sampler = SamplerConfig(steps=spec.steps, guidance_scale=spec.guidance, truncation="fixed", k=1,
                            estimator=estimator, lv_samples=spec.lv_samples)
    lora = LoraConfig(rank=spec.lora_rank, alpha=float(spec.lora_rank), init_seed=seed)
    cfg = TrainConfig(reward=spec.reward, width=spec.size, height=spec.size, seed=seed,
                      batch_size=spec.batch, lr=spec.lr, steps=max(1, spec.budget // spec.batch),
                      eval_every=spec.eval_every, eval_latents=spec.eval_latents, eval_batch_size=18)
    return sampler, lora, cfg


def run_one(spec: EstimatorSpec, estimator: str, seed: int) -> list[dict]:
    """One training run: its held-out reward, queries and training seconds at each evaluation."""
    torch.manual_seed(seed)
    train_p, eval_p = prompt_lists(spec)
    backend = diffusers_backend(build_model(spec.model, spec.model_seed), name=spec.model)
    sampler, lora, cfg = _configs(spec, estimator, seed)
    run = TrainRun(backend, make_reward(spec.reward), train_p, eval_p, sampler, lora, cfg)
    per_step = spec.batch * (spec.lv_samples + 1 if estimator == "draft_lv" else 1)
    curve = [{"queries": 0, "train_s": 0.0, "reward": run.evaluate()["eval_reward"]}]
    train_s = 0.0
    while not run.done:
        t0 = time.perf_counter()
        run.step()
        train_s += time.perf_counter() - t0
        if run.steps_done % spec.eval_every == 0 or run.done:
            curve.append({"queries": run.steps_done * per_step, "train_s": train_s,
                          "reward": run.evaluate()["eval_reward"]})
    print(f"[estimators] {spec.reward} {estimator} seed {seed}: held-out {curve[0]['reward']:.4f} -> "
          f"{curve[-1]['reward']:.4f} in {train_s:.0f} s", flush=True)
    return curve


def _seed_pair(spec: EstimatorSpec, seed: int) -> dict[str, list[dict]]:
    torch.set_num_threads(spec.threads)
    return {est: run_one(spec, est, seed) for est in ESTIMATORS}


def median_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise medians of runs evaluated at the same step counts."""
    return [{key: statistics.median(c[i][key] for c in curves) for key in curves[0][i]}
            for i in range(len(curves[0]))]


def first_reaching(curve: list[dict], level: float) -> dict | None:
    return next((c for c in curve if c["reward"] >= level), None)


def run(spec: EstimatorSpec) -> dict:
    if spec.workers > 1:
        ctx = __import__("multiprocessing").get_context("spawn")
        with ProcessPoolExecutor(spec.workers, mp_context=ctx) as pool:
            pairs = list(pool.map(_seed_pair, [spec] * len(spec.seeds), spec.seeds))
    else:
        pairs = [_seed_pair(spec, s) for s in spec.seeds]
    return summarise(spec, {est: [p[est] for p in pairs] for est in ESTIMATORS})


def summarise(spec: EstimatorSpec, runs: dict[str, list[list[dict]]]) -> dict:
    """Medians, the goal and the verdict from every seed's curves of both estimators."""
    med = {est: median_curve(runs[est]) for est in ESTIMATORS}
    goal = med["truncated"][-1]  # truncated K=1 at its query budget
    # a goal at or below the untrained start is met by not training: no verdict then
    improved = goal["reward"] > med["truncated"][0]["reward"]
    hit = first_reaching(med["draft_lv"], goal["reward"]) if improved else None
    fraction = None if hit is None else hit["train_s"] / goal["train_s"]
    return {"spec": asdict(spec), "runs": runs, "median": med, "goal": goal,
            "draft_lv_reach": hit, "draft_lv_queries": None if hit is None else hit["queries"],
            "wall_fraction": fraction, "target": TARGET_WALL_FRACTION, "truncated_improved": improved,
            "met": None if not improved else fraction is not None and fraction <= TARGET_WALL_FRACTION}


def quick(spec: EstimatorSpec) -> EstimatorSpec:
    return replace(spec, budget=16, eval_every=2, seeds=(0,), eval_prompts=6, eval_latents=1)
