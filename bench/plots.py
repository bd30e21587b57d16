"""PNG plots of the benchmark results (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2 ** 20


def memory_vs_k(mem: dict, out: Path, name: str = "memory_vs_k.png") -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ckpt, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in mem["rows"] if r["checkpoint"] == ckpt]
        label = "checkpointed" if ckpt else "no checkpointing"
        a.plot([r["K"] for r in rows], [r["saved_bytes"] / MIB for r in rows], style, label=label)
        b.plot([r["K"] for r in rows], [r["rss_growth"] / MIB for r in rows], style, label=label)
    a.set(xlabel="K (differentiable steps)", ylabel="saved for backward (MiB)", yscale="log")
    b.set(xlabel="K (differentiable steps)", ylabel="peak RSS growth (MiB)")
    a.legend()
    fig.suptitle(f"Memory vs K ({mem['model']}, {mem['px']} px, T={mem['T']}, reward {mem['reward']})")
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def efficiency_plot_name(reward: str | None = None) -> str:
    """File of item 4's plot: sample_efficiency.png for the main reward, with `reward` appended for others."""
    return f"sample_efficiency_{reward}.png" if reward else "sample_efficiency.png"


def efficiency(eff: dict, out: Path, name: str = efficiency_plot_name()) -> Path:
    ap, dd = eff["alignprop"], eff["ddpo"]
    panels = [("reward", "held-out reward", eff["ddpo_final"])]
    if eff.get("train_prompts"):
        panels.append(("train_reward", "training-prompt reward", eff["train_prompts"]["ddpo_final"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, ylabel, level) in zip(axes[0], panels):
        for i, run in enumerate(eff.get("alignprop_runs", [])):
            ax.plot([max(c["queries"], 1) for c in run], [c[key] for c in run], "-", color="tab:blue",
                    alpha=0.25, lw=0.8, label="AlignProp, each seed" if i == 0 else None)
        label = (f"AlignProp (ours), median of {len(eff['alignprop_runs'])}" if "alignprop_runs" in eff
                 else "AlignProp (ours)")
        ax.plot([max(c["queries"], 1) for c in ap], [c[key] for c in ap], "o-", color="tab:blue", label=label)
        others = [r for r in eff.get("ddpo_sweep", []) if r["lr"] != eff.get("ddpo_lr")]
        for i, r in enumerate(others):
            ax.plot([max(c["queries"], 1) for c in r["curve"]], [c[key] for c in r["curve"]], "--",
                    color="tab:orange", alpha=0.35, lw=0.8, label="DDPO, other lr" if i == 0 else None)
        dd_runs = eff.get("ddpo_runs", [])
        for i, run in enumerate(dd_runs if len(dd_runs) > 1 else []):
            ax.plot([max(c["queries"], 1) for c in run], [c[key] for c in run], "-", color="tab:orange",
                    alpha=0.25, lw=0.8, label="DDPO, each seed" if i == 0 else None)
        lr = f", lr {eff['ddpo_lr']:g}" if "ddpo_lr" in eff else ""
        lr += f", median of {len(dd_runs)}" if len(dd_runs) > 1 else ""
        ax.plot([max(c["queries"], 1) for c in dd], [c[key] for c in dd], "s-", color="tab:orange",
                label=f"DDPO{lr}")
        ax.axhline(level, color="gray", lw=0.8, ls=":", label=f"DDPO at {dd[-1]['queries']} queries")
        ax.set(xscale="log", xlabel="reward queries (images scored; 0 plotted at 1)", ylabel=ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sample efficiency ({eff['spec']['model']}, {eff['spec']['reward']})")
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(sc: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, rows, key, label in ((axes[0], sc["by_resolution"], "px", "resolution (px)"),
                                 (axes[1], sc["by_steps"], "T", "sampling steps T")):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["step_s"] for r in rows], "o-", label="training step (s)")
        ax.plot(xs, [r["sample_s"] for r in rows], "s--", label="no-grad sampling (s)")
        ax.set(xlabel=label, ylabel="seconds")
        twin = ax.twinx()
        twin.plot(xs, [r["rss_growth"] / MIB for r in rows], "^:", color="tab:red")
        twin.set_ylabel("peak RSS growth (MiB)", color="tab:red")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Scaling ({sc['model']}, K=1, CFG, checkpointing)")
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
