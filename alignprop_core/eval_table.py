"""The held-out evaluations of a run as a plain-text table, for the trainer node's output and logs.

One row per evaluation: the step, the training reward, each judge and the diversity of the held-out
images; the row of the best evaluation (the one the best LoRA was saved from) is marked.
"""
from __future__ import annotations

from typing import Any, Sequence


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluation_table(evals: Sequence[dict[str, Any]], best_step: int | None = None,
                     best_path: str | None = None, early_stopped: bool = False) -> str:
    """`evals` (records with step, eval_reward and optionally judges and diversity) as aligned text.

    Args:
        evals: the run's evaluation records, in order.
        best_step: the step of the best evaluation (marked with *), if a best LoRA was kept.
        best_path: the best LoRA's file, named under the table.
        early_stopped: the run stopped early because the chosen number had stopped improving.
    """
    if not evals:
        return "no held-out evaluation was run"
    judges = list(dict.fromkeys(name for e in evals for name in (e.get("judges") or {})))
    has_diversity = any(e.get("diversity") is not None for e in evals)
    header = ["step", "reward", *judges] + (["diversity"] if has_diversity else [])
    rows = []
    for e in evals:
        row = [str(e["step"]) + (" *" if best_step is not None and e["step"] == best_step else ""),
               _cell(e.get("eval_reward")), *(_cell((e.get("judges") or {}).get(n)) for n in judges)]
        rows.append(row + ([_cell(e.get("diversity"))] if has_diversity else []))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    if best_path:
        lines.append(f"* best evaluation: step {best_step}, LoRA {best_path}")
    if early_stopped:
        lines.append(f"stopped early after step {evals[-1]['step']}: no better evaluation in the last ones")
    return "\n".join(lines)
