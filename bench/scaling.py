"""Item 5, scaling: step time and peak memory versus resolution and versus the number of sampling
steps T (K=1, CFG, checkpointing on), plus the full SD1.5 architecture (random weights) at 64 and
128 px as one row, each configuration in a fresh process.
"""
from __future__ import annotations

from dataclasses import asdict

from bench.rig import RigSpec
from bench.subproc import run_worker
from bench.timing import median, paired_ratio


def _measure(spec: RigSpec, repeats: int, threads: int, sample: bool = True) -> dict:
    res = run_worker("bench.worker", {**asdict(spec), "_repeats": repeats, "_threads": threads,
                                      "_sample": sample})
    return {"model": spec.model, "px": spec.size, "T": spec.steps, "batch": spec.batch,
            "step_s": median(res["step_s"]), "sample_s": median(res["sample_s"]) if sample else None,
            "ratio": paired_ratio(res["step_s"], res["sample_s"]) if sample else None,
            "rss_growth": res["rss_growth"], "rss_base": res["rss_base"], "saved_bytes": res["saved_bytes"]}


def run(model: str, reward: str, resolutions: list[int], step_counts: list[int], repeats: int,
        threads: int, sd15_px: list[int], sd15_steps: int) -> dict:
    by_res, by_steps, sd15 = [], [], []
    for px in resolutions:
        by_res.append(_measure(RigSpec(model=model, reward=reward, px=px), repeats, threads))
        print(f"[scaling] {model} {px}px: {by_res[-1]['step_s']:.2f} s/step", flush=True)
    for t in step_counts:
        by_steps.append(_measure(RigSpec(model=model, reward=reward, steps=t), repeats, threads))
        print(f"[scaling] {model} T={t}: {by_steps[-1]['step_s']:.2f} s/step", flush=True)
    for px in sd15_px:
        sd15.append(_measure(RigSpec(model="sd15", reward=reward, px=px, steps=sd15_steps, batch=1),
                             1, threads))
        print(f"[scaling] sd15 {px}px T={sd15_steps}: {sd15[-1]['step_s']:.1f} s/step", flush=True)
    return {"model": model, "by_resolution": by_res, "by_steps": by_steps, "sd15": sd15}
