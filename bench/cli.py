"""Command line: `python -m bench run --out bench/results [--quick] [--model tiny] [--reward ...]`.

Runs the benchmarks (or those named with --only; --merge keeps the other items of an earlier run), writes results.json, RESULTS.md and
the PNG plots into --out. `--quick` shrinks repeats, sweeps and budgets to finish in a few minutes.
The sample-efficiency model and reward are options, so the pretrained toy world is one flag away:
`--efficiency-model alignprop_core/data/toy_world --efficiency-reward toy_count`.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alignprop_core.cli import parse_reward_args
from alignprop_core.config import REWARD_AUGMENTS
from bench import data_parallel, efficiency, estimators, memory, overhead, plots, reference, scaling
from bench.machine import describe, load_average
from bench.report import render, write_readme_summary

ITEMS = ("overhead", "memory", "reference", "efficiency", "scaling", "estimators", "data_parallel")


@dataclass
class Plan:
    """Sizes of every benchmark for one mode."""

    repeats: int
    memory_repeats: int
    overhead_models: list[str]
    resolutions: list[int]
    step_counts: list[int]
    sd15_px: list[int]
    sd15_steps: int
    reference_models: list[str]
    alignprop_queries: int
    ddpo_queries: int
    ddpo_eval_every: int
    efficiency_steps: int
    alignprop_seeds: tuple[int, ...]
    ddpo_lr_count: int | None  # how many of the DDPO learning rates given are run (None: all)
    ddpo_seeds: tuple[int, ...] = (0,)  # DDPO runs per learning rate (the median is judged)
    memory_ks: tuple[int, ...] = memory.KS
    estimator_budget: int = 512  # truncated K=1's reward queries in item 6
    estimator_seeds: tuple[int, ...] = tuple(range(8))


FULL = Plan(repeats=5, memory_repeats=2, overhead_models=["tiny", "small", "tiny-sd3", "tiny-flux"], resolutions=[32, 64, 96],
            step_counts=[10, 20, 50], sd15_px=[64, 128], sd15_steps=4, reference_models=["tiny", "small"],
            alignprop_queries=256, ddpo_queries=1024, ddpo_eval_every=128, efficiency_steps=10,
            alignprop_seeds=tuple(range(8)), ddpo_lr_count=None, ddpo_seeds=(0, 1, 2))
QUICK = Plan(repeats=3, memory_repeats=1, overhead_models=["tiny", "tiny-flux"], resolutions=[32, 48],
             step_counts=[10, 20], sd15_px=[], sd15_steps=4, reference_models=["tiny"],
             alignprop_queries=8, ddpo_queries=64, ddpo_eval_every=64, efficiency_steps=10, alignprop_seeds=(0, 1),
             ddpo_lr_count=1, memory_ks=(1, 20), estimator_budget=16, estimator_seeds=(0,))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmarks and write RESULTS.md, results.json and plots")
    r.add_argument("--out", default="bench/results", help="output folder")
    r.add_argument("--quick", action="store_true", help="small sweeps and budgets (a few minutes)")
    r.add_argument("--only", nargs="+", choices=ITEMS, default=list(ITEMS), help="benchmarks to run")
    r.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    r.add_argument("--merge", action="store_true", help="keep the other items of --out's results.json "
                   "(run some items again without the rest)")
    r.add_argument("--reward", default="smoothness", help="reward of items 1, 2, 3 and 5")
    r.add_argument("--memory-model", default="alignprop_core/data/toy_world",
                   help="model of item 2 (tiny | small | folder; default: the toy world)")
    r.add_argument("--memory-reward", default="toy_count",
                   help="reward of item 2 (default: the toy world's count classifier, as in the demo)")
    r.add_argument("--memory-worst-case", action=argparse.BooleanOptionalAction, default=True,
                   help="also run item 2 on the tiny model with the weight-free --reward (nothing but "
                        "latents to save: the worst case of the saved-bytes ratio)")
    r.add_argument("--memory-flow-models", nargs="*", default=["tiny-sd3", "tiny-flux"],
                   help="item 2 again on these rectified-flow models (with --memory-reward); none: skip")
    r.add_argument("--scaling-model", default="tiny", help="model of the item 5 sweeps")
    r.add_argument("--efficiency-model", default="alignprop_core/data/toy_world",
                   help="model of item 4: tiny | small | a diffusers folder (e.g. the toy world)")
    r.add_argument("--efficiency-reward", default="toy_count",
                   help="reward of item 4 (default: the toy world's count reward)")
    r.add_argument("--efficiency-reward-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of item 4's reward factory (JSON value), repeatable, "
                        "e.g. kind=\"prob\" or temperature=2")
    r.add_argument("--efficiency-also", nargs="*", default=["jpeg_compressibility"], metavar="REWARD",
                   help="item 4 again with each of these rewards (same model, prompts and settings; "
                        "default: jpeg_compressibility, the paper's compressibility task; none: no reward)")
    r.add_argument("--efficiency-lr", type=float, default=1.5e-3,
                   help="AlignProp learning rate of item 4 (default: the demo's)")
    r.add_argument("--efficiency-k", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="AlignProp's truncation in item 4: K drawn uniformly from MIN..MAX of the T=10 "
                        "steps (default: the demo's)")
    r.add_argument("--efficiency-lora-targets", nargs="+", default=None, metavar="SUFFIX",
                   help="LoRA target modules of both methods in item 4 and its --efficiency-also runs "
                        "(LoraConfig.target_modules; default: the demo's)")
    r.add_argument("--efficiency-reward-augment", default="none", choices=REWARD_AUGMENTS,
                   help="AlignProp's TrainConfig.reward_augment in item 4 and its --efficiency-also runs")
    r.add_argument("--efficiency-also-lr", type=float, default=1e-2,
                   help="AlignProp learning rate of the --efficiency-also runs (each method's lr is tuned "
                        "per reward, see bench/README.md; on jpeg_compressibility 1.5e-3, 3e-3, 6e-3 and "
                        "1e-2 were tried and 1e-2 is the fastest)")
    r.add_argument("--efficiency-also-ddpo-lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2],
                   help="DDPO learning rates of the --efficiency-also runs: one DDPO run each, the "
                        "strongest at 1,024 queries is the baseline (on jpeg_compressibility 3e-3 barely "
                        "moved, 3e-2 collapsed)")
    r.add_argument("--ddpo-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 5e-3],
                   help="DDPO learning rates of item 4: one DDPO run each, and the one with the highest "
                        "held-out reward at 1,024 queries is the baseline (TRL's default 3e-4 left the "
                        "toy world's held-out reward flat over 1,024 queries, 1e-2 collapsed)")
    r.add_argument("--ddpo-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="DDPO's seeds in item 4 and its --efficiency-also runs: one run per seed and learning "
                        "rate, each lr judged by the median of its seeds (default: 0 1 2; --quick: 0)")
    r.add_argument("--efficiency-workers", type=int, default=2,
                   help="processes for item 4's runs (DDPO and the AlignProp seeds side by side; it "
                        "counts queries, not seconds, so sharing the cores does not bias it)")
    r.add_argument("--estimator-rewards", nargs="+", default=["toy_count", "jpeg_compressibility"],
                   metavar="REWARD=LR", help="item 6's tasks on --efficiency-model, each with AlignProp's "
                   "learning rate for both estimators (default: toy_count at 1.5e-3, the demo's, and "
                   "jpeg_compressibility at 1e-2, item 4b's)")
    r.add_argument("--estimator-workers", type=int, default=2,
                   help="processes for item 6's seeds (each runs both estimators, one after the other)")
    r.add_argument("--efficiency-prompts", default="auto", help="shipped prompt lists: animals | toy | auto")
    r.add_argument("--official-repo", default=None,
                   help="the official AlignProp repository (checkout, bare git dir or its sd_pipeline.py); "
                        "without it the official implementation is skipped")
    r.add_argument("--cache", default="bench/.cache", help="where model folders are written")
    r.add_argument("--readme", default=None, help="also rewrite the summary table between the bench "
                   "markers of this file (make bench: README.md)")
    g = sub.add_parser("render", help="rewrite RESULTS.md from the results.json of an earlier run")
    g.add_argument("--out", default="bench/results", help="folder holding results.json")
    g.add_argument("--readme", default=None, help="also rewrite the summary table in this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "render":
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        (out / "RESULTS.md").write_text(render(results), encoding="utf-8")
        print(f"wrote {out / 'RESULTS.md'}")
        if args.readme:
            write_readme_summary(Path(args.readme), results)
            print(f"wrote the summary table into {args.readme}")
        return 0
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    earlier = out / "results.json"
    results: dict = json.loads(earlier.read_text()) if args.merge and earlier.exists() else {}
    kept = {k: results[k] for k in ("machine", "quick", "args", "minutes", "load_end") if k in results}
    results.update({"machine": describe("cpu", args.threads).as_dict(), "quick": args.quick, "args": vars(args)})
    if "overhead" in args.only:
        results["overhead"] = overhead.run(plan.overhead_models, plan.repeats, args.threads, args.reward)
    if "memory" in args.only:
        results["memory"] = memory.run(args.memory_model, args.memory_reward, plan.memory_repeats,
                                       args.threads, plan.memory_ks)
        plots.memory_vs_k(results["memory"], out)
        if args.memory_worst_case:
            results["memory_worst_case"] = memory.run("tiny", args.reward, plan.memory_repeats,
                                                      args.threads, plan.memory_ks)
            plots.memory_vs_k(results["memory_worst_case"], out, "memory_vs_k_worst_case.png")
        results["memory_flow"] = [memory.run(model, args.memory_reward, plan.memory_repeats, args.threads,
                                             plan.memory_ks) for model in args.memory_flow_models]
    if "reference" in args.only:
        results["reference"] = reference.run(plan.reference_models, args.reward, min(plan.repeats, 3),
                                             args.threads, cache, args.official_repo)
    if "efficiency" in args.only:
        spec = efficiency.EfficiencySpec(
            model=args.efficiency_model, reward=args.efficiency_reward, prompts=args.efficiency_prompts,
            reward_args=parse_reward_args(args.efficiency_reward_arg),
            steps=plan.efficiency_steps, alignprop_queries=plan.alignprop_queries,
            ddpo_queries=plan.ddpo_queries, ddpo_eval_every=plan.ddpo_eval_every,
            ddpo_lrs=tuple(args.ddpo_lrs[:plan.ddpo_lr_count]),
            ddpo_seeds=tuple(args.ddpo_seeds) if args.ddpo_seeds else plan.ddpo_seeds,
            alignprop_lr=args.efficiency_lr, alignprop_reward_augment=args.efficiency_reward_augment,
            **(dict(k_min=args.efficiency_k[0], k_max=args.efficiency_k[1]) if args.efficiency_k else {}),
            **(dict(lora_targets=tuple(args.efficiency_lora_targets)) if args.efficiency_lora_targets else {}),
            alignprop_seeds=plan.alignprop_seeds, workers=args.efficiency_workers, threads=args.threads)
        results["efficiency"] = efficiency.run(spec)
        plots.efficiency(results["efficiency"], out)
        if args.efficiency_also:
            also = replace(spec, reward_args={}, alignprop_lr=args.efficiency_also_lr,
                           ddpo_lrs=tuple(args.efficiency_also_ddpo_lrs[:plan.ddpo_lr_count]))
            results["efficiency_more"] = [efficiency.run(replace(also, reward=reward))
                                          for reward in args.efficiency_also]
            for eff in results["efficiency_more"]:
                plots.efficiency(eff, out, plots.efficiency_plot_name(eff["spec"]["reward"]))
    if "estimators" in args.only:
        results["estimators"] = []
        for task in args.estimator_rewards:
            reward, _, lr = task.partition("=")
            lr = float(lr) if lr else {"jpeg_compressibility": 1e-2}.get(reward, 1.5e-3)
            spec = estimators.EstimatorSpec(model=args.efficiency_model, reward=reward, lr=lr,
                                            budget=plan.estimator_budget, seeds=plan.estimator_seeds,
                                            workers=args.estimator_workers, threads=args.threads)
            results["estimators"].append(estimators.run(estimators.quick(spec) if args.quick else spec))
    if "scaling" in args.only:
        results["scaling"] = scaling.run(args.scaling_model, args.reward, plan.resolutions, plan.step_counts,
                                         plan.memory_repeats + 1, args.threads, plan.sd15_px, plan.sd15_steps)
        plots.scaling(results["scaling"], out)
    if "data_parallel" in args.only:
        results["data_parallel"] = (data_parallel.run(repeats=2, rounds=1) if args.quick
                                    else data_parallel.run(repeats=8, rounds=5))
    results["load_end"] = load_average()
    results["minutes"] = (time.perf_counter() - t0) / 60
    if kept:  # the earlier run's machine and times head the page; this run is a note
        m = results["machine"]
        results.setdefault("notes", []).append(
            f"{', '.join(args.only)} run on its own ({time.strftime('%Y-%m-%d')}, "
            f"{results['minutes']:.1f} min, load {tuple(m['load_start'])} -> {tuple(results['load_end'])}) "
            "and merged into the earlier results with --merge")
        results.update(kept)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "RESULTS.md").write_text(render(results), encoding="utf-8")
    if args.readme:
        write_readme_summary(Path(args.readme), results)
    print(f"wrote {out / 'RESULTS.md'} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
