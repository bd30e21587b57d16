"""Item 2, memory versus K: bytes saved for backward and peak RSS growth of a training step for
K = 1, 5, 10, 20, with and without gradient checkpointing, each configuration in a fresh process.

Targets with checkpointing: saved-for-backward at K=20 <= 1.2x that at K=1; peak RSS growth from K=1
to K=20 <= 1.5x. Checkpointing keeps exactly one latent per differentiable step, so the saved-bytes
ratio is 1 + 19 * latent / saved(K=1): it is met when the reward or decoder saves much more than a
latent (any reward network), and missed for a weight-free reward on a tiny image.
"""
from __future__ import annotations

from dataclasses import asdict

from bench.rig import RigSpec
from bench.subproc import run_worker
from bench.timing import median

KS = (1, 5, 10, 20)
SAVED_TARGET = 1.2
RSS_TARGET = 1.5


def run(model: str, reward: str, repeats: int, threads: int, ks: tuple[int, ...] = KS,
        steps: int = 20) -> dict:
    rows = []
    for ckpt in (True, False):
        for k in ks:
            spec = RigSpec(model=model, reward=reward, steps=steps, k=k, checkpoint=ckpt)
            res = run_worker("bench.worker", {**asdict(spec), "_repeats": repeats, "_threads": threads})
            rows.append({"checkpoint": ckpt, "K": k, "saved_bytes": res["saved_bytes"],
                         "latent_bytes": res["latent_bytes"], "rss_growth": res["rss_growth"],
                         "rss_base": res["rss_base"], "step_s": median(res["step_s"])})
            print(f"[memory] ckpt={ckpt} K={k}: saved {res['saved_bytes']/2**20:.2f} MiB, "
                  f"RSS +{res['rss_growth']/2**20:.1f} MiB", flush=True)
    by = {(r["checkpoint"], r["K"]): r for r in rows}
    lo, hi = min(ks), max(ks)
    saved_ratio = by[(True, hi)]["saved_bytes"] / by[(True, lo)]["saved_bytes"]
    rss_ratio = by[(True, hi)]["rss_growth"] / by[(True, lo)]["rss_growth"]
    return {"model": model, "reward": reward, "px": RigSpec(model=model).size, "T": steps, "rows": rows,
            "saved_ratio": saved_ratio, "rss_ratio": rss_ratio, "k_lo": lo, "k_hi": hi,
            "saved_met": saved_ratio <= SAVED_TARGET, "rss_met": rss_ratio <= RSS_TARGET}
