"""Item 1, training overhead: one AlignProp optimiser step (T DDIM steps, K=1, CFG, reward backward,
AdamW) divided by plain no-grad sampling of the same T steps plus decode, same model, batch, prompts.

Both are timed in the same fresh process, interleaved round by round; the ratio is the median of the
per-round ratios. The floor is about (T+3)/T (the window step runs forward, recompute and backward)
plus the decoder's recompute and backward.
"""
from __future__ import annotations

from dataclasses import asdict

from bench.rig import RigSpec
from bench.subproc import run_worker
from bench.timing import median, paired_ratio

TARGET = 1.25


def run(models: list[str], repeats: int, threads: int, reward: str, steps: int = 20) -> list[dict]:
    rows = []
    for model in models:
        spec = RigSpec(model=model, reward=reward, steps=steps, k=1)
        res = run_worker("bench.worker", {**asdict(spec), "_repeats": repeats, "_threads": threads,
                                          "_sample": True})
        ratio = paired_ratio(res["step_s"], res["sample_s"])
        rows.append({"model": model, "px": spec.size, "T": steps, "K": 1, "batch": spec.batch,
                     "sample_s": median(res["sample_s"]), "step_s": median(res["step_s"]),
                     "ratio": ratio, "floor": (steps + 3) / steps, "target": TARGET,
                     "met": ratio <= TARGET, "repeats": repeats, "raw": res})
        print(f"[overhead] {model}: step/sample = {ratio:.3f}", flush=True)
    return rows
