"""Pictures of a run: the reward curve and the before/after image grid (PNG, via matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _watched(evals: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Label -> (steps, values) of each judge and of the diversity, over the evaluations that have it."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for e in evals:
        numbers = {f"judge {name}": v for name, v in (e.get("judges") or {}).items()}
        numbers["diversity"] = e.get("diversity")
        for label, value in numbers.items():
            if value is not None:
                steps, values = lines.setdefault(label, ([], []))
                steps.append(e["step"])
                values.append(value)
    return lines


def plot_reward_curve(history: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]],
                      path: str | Path, title: str = "AlignProp reward") -> Path:
    """Training reward per optimiser step and held-out reward at evaluation points; below, when the
    evaluations have them, each judge and the held-out diversity (one shared axis, values as they are)."""
    plt = _pyplot()
    watched = _watched(evals)
    if watched:
        fig, (ax, low) = plt.subplots(2, 1, figsize=(6, 6), dpi=110, sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    done = [h for h in history if not h.get("skipped")]
    if done:
        ax.plot([h["step"] for h in done], [h["reward"] for h in done], lw=1, alpha=0.6,
                label="train batch reward")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_reward"] for e in evals], "o-", lw=2,
                label="held-out reward (fixed latents)")
    if not watched:  # with a panel below, the step axis is labelled there
        ax.set_xlabel("optimiser step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if watched:
        for label, (steps, values) in watched.items():
            low.plot(steps, values, "o-", lw=1.5, label=label)
        low.set_xlabel("optimiser step")
        low.set_ylabel("held-out judges, diversity")
        low.grid(alpha=0.3)
        low.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _two_lines(text: str, width: int = 22) -> str:
    """A prompt wrapped into at most two lines of `width` characters (ellipsis if longer)."""
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][:width - 1] + "…"]
    return "\n".join(lines)


def save_before_after_grid(before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str],
                           before_scores: Sequence[float], after_scores: Sequence[float],
                           path: str | Path, columns: int = 8) -> Path:
    """Images (N,3,H,W) in [0,1] before and after training, one column per prompt with its reward;
    at most `columns` prompts per line, each line a pair of rows (before above after)."""
    if before.shape != after.shape or before.shape[0] != len(prompts):
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must match "
                         f"and hold one image per prompt ({len(prompts)}).")
    plt = _pyplot()
    n = len(prompts)
    cols = max(1, min(columns, n))
    lines = -(-n // cols)
    fig, axes = plt.subplots(2 * lines, cols, figsize=(1.8 * cols, 2.3 * 2 * lines), dpi=110,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        line, col = divmod(i, cols)
        for row, (images, scores, label) in enumerate(((before, before_scores, "before"),
                                                       (after, after_scores, "after"))):
            ax = axes[2 * line + row][col]
            ax.axis("on")
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{_two_lines(prompts[i])}\n{scores[i]:.3f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
