"""Picking the best evaluation of a run, and deciding when to stop early.

`TrainConfig.best_by` names one held-out number of the evaluation records (`evaluate.HeldOutScores.
record`): "reward" (the training reward, eval_reward), "diversity", or a judge's name. Higher is
better; of equal values the earlier evaluation wins, and a missing or non-finite value never wins.
Choosing a judge (a reward never trained on) keeps the LoRA from before the training reward was
hacked; early stopping ends the run once that number has stopped improving.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

BEST = "-best"


def eval_value(record: dict[str, Any], best_by: str) -> float | None:
    """The number `best_by` names in one evaluation record (None if the record lacks it)."""
    if best_by == "reward":
        value = record.get("eval_reward")
    elif best_by == "diversity":
        value = record.get("diversity")
    else:
        value = (record.get("judges") or {}).get(best_by)
    return float(value) if value is not None and math.isfinite(value) else None


def best_index(evals: Sequence[dict[str, Any]], best_by: str) -> int | None:
    """Index of the best evaluation (the first of equals); None if no evaluation has the number."""
    best, where = None, None
    for i, record in enumerate(evals):
        value = eval_value(record, best_by)
        if value is not None and (best is None or value > best):
            best, where = value, i
    return where


def stalled(evals: Sequence[dict[str, Any]], best_by: str, patience: int) -> bool:
    """True once the last `patience` (> 0) evaluations all came after the best one: none of them
    improved on it (a tie is no improvement). Always False for patience 0."""
    if patience <= 0:
        return False
    where = best_index(evals, best_by)
    return where is not None and len(evals) - 1 - where >= patience


def best_lora_name(lora_name: str) -> str:
    """``<stem>-best.safetensors`` for a LoRA file name ``<stem>.safetensors``."""
    path = Path(lora_name)
    return path.stem + BEST + path.suffix
