"""Writing a run's metrics to disk: one CSV row per optimiser step and a JSON file with everything.

Step rows hold the step's reward, loss (with any penalties), K, gradient norm, whether it was skipped,
and the penalties' values: pull (toward the base model; 0 when kl_weight is 0) and lora_l2.

Rows of an evaluated step (and the step-0 row) also hold the held-out numbers: eval_reward, one
``judge_<name>`` column per judge (`TrainConfig.judges`) and diversity.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence


def write_metrics(out_dir: str | Path, history: Sequence[dict[str, Any]],
                  evals: Sequence[dict[str, Any]], config: dict[str, Any]) -> tuple[Path, Path]:
    """Write metrics.csv (per step, with the held-out reward where evaluated) and metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_at = {e["step"]: eval_columns(e) for e in evals}
    judges = list(dict.fromkeys(name for e in evals for name in e.get("judges") or {}))
    columns = ["step", "reward", "loss", "k", "grad_norm", "skipped", "pull", "lora_l2", "eval_reward",
               *(f"judge_{name}" for name in judges), "diversity"]
    csv_path = out / "metrics.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        writer.writeheader()
        if 0 in eval_at:
            writer.writerow({"step": 0, **eval_at[0]})
        for h in history:
            writer.writerow({**h, "eval_reward": "", **eval_at.get(h["step"], {})})
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps({"config": config, "history": list(history),
                                     "evals": list(evals)}, indent=1))
    return csv_path, json_path


def eval_columns(record: dict[str, Any]) -> dict[str, Any]:
    """One evaluation record as CSV cells: eval_reward, judge_<name> per judge, diversity ('' if None)."""
    diversity = record.get("diversity")
    return {"eval_reward": record["eval_reward"],
            **{f"judge_{name}": value for name, value in (record.get("judges") or {}).items()},
            "diversity": "" if diversity is None else diversity}
