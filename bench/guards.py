"""Guards against reward hacking, measured on the toy world: `python -m bench.guards`.

The demo's run (toy world model, toy_count reward, 50 steps) is trained with several seeds, once
without a guard and once per penalty setting (the pull toward the base model, `kl_weight`, and the
L2 penalty on the LoRA's weight change, `lora_l2_weight`). Every evaluation scores the held-out
images with the training reward, with the weight-free blob count (`toy_blobs`, the judge the
classifier reward cannot fool) and measures their diversity. The study asks whether a guard keeps
every seed's blob-count accuracy at or above its start while the median held-out reward keeps at
least 90% of the unguarded gain, and writes the trade-off as bench/results/guards.json, a table in
docs/guards.md and the plot docs/images/guards.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
KEEP_GAIN = 0.9  # share of the unguarded median gain a guard must keep
JUDGE = "toy_blobs"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One guard configuration; label is how tables and plots name it."""

    label: str
    kl_weight: float = 0.0
    lora_l2_weight: float = 0.0


# the pull is ~3e-3 after 15 unguarded demo steps (LoRA and base outputs barely differ): weights of
# 10 and 100 make it matter against the reward's loss (~2; at 1000 seed 0 did not learn at all); L2 at 0.1
# keeps ||dW||^2 a few times smaller (at 1, seed 0 kept a seventh of the unguarded gain)
DEFAULT_SETTINGS = (Setting("no guard"), Setting("pull 10", kl_weight=10.0), Setting("pull 100", kl_weight=100.0),
                    Setting("L2 0.1", lora_l2_weight=0.1))


def run_one(setting: Setting, seed: int, steps: int, threads: int) -> dict[str, Any]:
    """One demo-preset run with `setting`'s penalties and `seed`; its evaluations and step seconds."""
    from alignprop_core.cli import demo_preset
    from alignprop_core.files.prompts import shipped_prompts
    from alignprop_core.models.loading import load_backend
    from alignprop_core.toy import toy_model_dir
    from alignprop_core.training.run import TrainRun

    torch.set_num_threads(threads)
    sampler, lora, cfg = demo_preset()
    lora = dataclasses.replace(lora, init_seed=seed)
    cfg = dataclasses.replace(cfg, seed=seed, steps=steps, eval_every=max(1, steps // 2), judges=(JUDGE,),
                              kl_weight=setting.kl_weight, lora_l2_weight=setting.lora_l2_weight)
    from alignprop_core.rewards import make_reward

    backend = load_backend(toy_model_dir())
    run = TrainRun(backend, make_reward(cfg.reward), shipped_prompts("toy_train"), shipped_prompts("toy_eval"),
                   sampler, lora, cfg)
    evals = [run.evaluate()]
    train_s = 0.0
    while not run.done:
        t0 = time.perf_counter()
        run.step()
        train_s += time.perf_counter() - t0
        if run.steps_done % cfg.eval_every == 0 or run.done:
            evals.append(run.evaluate())
    first, last = evals[0], evals[-1]
    print(f"[guards] {setting.label} seed {seed}: reward {first['eval_reward']:.3f} -> {last['eval_reward']:.3f}, "
          f"blobs {first['judges'][JUDGE]:.3f} -> {last['judges'][JUDGE]:.3f}, "
          f"diversity {first['diversity']:.4f} -> {last['diversity']:.4f} ({train_s:.0f} s)", flush=True)
    return {"setting": setting.label, "seed": seed, "evals": evals, "step_s": train_s / max(run.steps_done, 1)}


def _images(runs: list[dict[str, Any]]) -> int:
    """Held-out images per evaluation: the shipped toy_eval prompts times the demo's eval_latents."""
    from alignprop_core.cli import demo_preset
    from alignprop_core.files.prompts import shipped_prompts

    return len(shipped_prompts("toy_eval")) * demo_preset()[2].eval_latents


def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def summarise(settings: list[Setting], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: medians of the held-out reward gain, blob accuracy and diversity, the seeds whose
    blob accuracy ended below its start, and the verdict against the goal."""
    rows = []
    for s in settings:
        mine = [r for r in runs if r["setting"] == s.label]
        start, end = ([r["evals"][i] for r in mine] for i in (0, -1))
        gain = [b["eval_reward"] - a["eval_reward"] for a, b in zip(start, end)]
        blob_delta = [b["judges"][JUDGE] - a["judges"][JUDGE] for a, b in zip(start, end)]
        rows.append({"setting": s.label, "kl_weight": s.kl_weight, "lora_l2_weight": s.lora_l2_weight,
                     "seeds": len(mine), "reward_start": statistics.median(a["eval_reward"] for a in start),
                     "reward_end": statistics.median(b["eval_reward"] for b in end),
                     "reward_gain": statistics.median(gain),
                     "blobs_start": statistics.median(a["judges"][JUDGE] for a in start),
                     "blobs_end": statistics.median(b["judges"][JUDGE] for b in end),
                     "blobs_delta": statistics.median(blob_delta),
                     "seeds_blobs_below_start": sum(d < 0 for d in blob_delta),
                     "worst_gain": min(gain), "worst_blobs_delta": min(blob_delta),
                     "diversity_start": statistics.median(a["diversity"] for a in start),
                     "diversity_end": statistics.median(b["diversity"] for b in end),
                     "step_s": statistics.median(r["step_s"] for r in mine),
                     "per_seed": [{"seed": r["seed"], "reward_gain": g, "blobs_delta": d}
                                  for r, g, d in zip(mine, gain, blob_delta)]})
    base = rows[0]["reward_gain"]
    for row in rows[1:]:
        row["gain_kept"] = row["reward_gain"] / base if base > 0 else None
        row["met"] = (row["seeds_blobs_below_start"] == 0 and row["gain_kept"] is not None
                      and row["gain_kept"] >= KEEP_GAIN)
    return {"goal": f"no seed's blob accuracy below its start, median held-out reward gain >= "
                    f"{KEEP_GAIN:.0%} of the unguarded one", "rows": rows}


def table(summary: dict[str, Any]) -> str:
    """The trade-off as a markdown table."""
    lines = ["| setting | held-out reward (start -> end) | gain kept | blob accuracy (start -> end) | "
             "seeds with fewer correct blobs | worst seed: reward gain, blob change | diversity (start -> end) | "
             "s / step | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        kept = "-" if "gain_kept" not in r else ("n/a" if r["gain_kept"] is None else f"{r['gain_kept']:.0%}")
        met = "-" if "met" not in r else ("met" if r["met"] else "missed")
        lines.append(f"| {r['setting']} | {r['reward_start']:.3f} -> {r['reward_end']:.3f} | {kept} | "
                     f"{r['blobs_start']:.3f} -> {r['blobs_end']:.3f} | {r['seeds_blobs_below_start']} of "
                     f"{r['seeds']} | {r['worst_gain']:+.3f}, {r['worst_blobs_delta']:+.3f} | "
                     f"{r['diversity_start']:.4f} -> {r['diversity_end']:.4f} | "
                     f"{r['step_s']:.2f} | {met} |")
    return "\n".join(lines)


def seed_table(summary: dict[str, Any], images: int) -> str:
    """Each seed's held-out reward gain and change in correctly counted images, per setting."""
    rows = summary["rows"]
    lines = ["| seed | " + " | ".join(r["setting"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for i, first in enumerate(rows[0]["per_seed"]):
        cells = [f"{r['per_seed'][i]['reward_gain']:+.3f}, {round(r['per_seed'][i]['blobs_delta'] * images):+d}"
                 for r in rows]
        lines.append(f"| {first['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Each seed's held-out reward gain against its blob-accuracy change, one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(summary["rows"]):
        colour = f"C{i}"
        ax.scatter([p["reward_gain"] for p in r["per_seed"]], [p["blobs_delta"] for p in r["per_seed"]],
                   color=colour, alpha=0.45, s=22)
        ax.scatter([r["reward_gain"]], [r["blobs_delta"]], color=colour, s=120, marker="*",
                   edgecolor="black", label=f"{r['setting']} (median)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(xlabel="held-out toy_count reward gain (end - start)",
           ylabel="blob-count accuracy change (end - start)",
           title="Guards on the toy world: reward gain vs what the blobs say")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_doc(summary: dict[str, Any], path: Path, image: Path, command: str) -> None:
    rows = summary["rows"]
    verdicts = [f"{r['setting']}: {'met' if r['met'] else 'missed'}" for r in rows[1:]]
    images = summary["images"]
    text = f"""# Guards against reward hacking on the toy world

Generated by `{command}` (results: `bench/results/guards.json`).

The demo's run (toy world model, `toy_count` reward, {summary['steps']} steps of batch 4, K drawn from 3-6 of 10
DDIM steps) trained with {rows[0]['seeds']} seeds per setting. Each evaluation scores the {images} held-out images
with the training reward, with the weight-free blob count (`toy_blobs`: the share of images whose separate
blobs number as the prompt asks; it has no weights to fool) and measures their diversity (mean pairwise RMS
distance of the images of one prompt, 32 x 32). "pull w" is `kl_weight = w` (the mean squared difference of
the LoRA and base denoiser outputs on the window steps); "L2 w" is `lora_l2_weight = w`.
Values are medians over seeds; s / step is the median training time per optimiser step on this machine's CPU
(one thread per run, two runs at a time).

{table(summary)}

Goal: {summary['goal']}. Verdicts: {'; '.join(verdicts)}.

Per seed: the held-out reward gain, and how many of the {images} held-out images more (+) or fewer (-)
have the requested number of blobs at the end than at the start (one image is {1 / images:.3f} of accuracy):

{seed_table(summary, images)}

![Reward gain against blob accuracy change per seed](images/{image.name})

Each small dot is one seed's run; the star is the setting's median.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guards", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="optimiser steps per run (the demo's 50)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 steps, two settings: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guards.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "guards.md")
    parser.add_argument("--render", action="store_true", help="write the document and plot again from --out's "
                        "runs, without training")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.out.read_text())
        settings = [Setting(r["setting"], r["kl_weight"], r["lora_l2_weight"]) for r in saved["rows"]]
        runs = saved["runs"]
        summary = {**summarise(settings, runs), "steps": saved["steps"], "images": _images(runs), "runs": runs}
        args.out.write_text(json.dumps(summary, indent=1))
        write_doc(summary, args.doc, plot(summary, args.doc.parent / "images" / "guards.png"),
                  saved.get("command", "python -m bench.guards"))
        print(table(summary))
        return 0
    settings = list(DEFAULT_SETTINGS[:2] if args.quick else DEFAULT_SETTINGS)
    seeds, steps = (2, 4) if args.quick else (args.seeds, args.steps)
    jobs = [(s, seed, steps, 1) for seed in range(seeds) for s in settings]
    if args.workers > 1:
        ctx = __import__("multiprocessing").get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            runs = list(pool.map(_job, jobs))
    else:
        runs = [_job(j) for j in jobs]
    command = "python -m bench.guards" + (" --quick" if args.quick else "")
    summary = {**summarise(settings, runs), "steps": steps, "images": _images(runs), "command": command,
               "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    write_doc(summary, args.doc, plot(summary, args.doc.parent / "images" / "guards.png"), command)
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
