"""Writing a run's metrics to disk: one CSV row per optimiser step and a JSON file with everything."""
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
    eval_at = {e["step"]: e["eval_reward"] for e in evals}
    columns = ["step", "reward", "loss", "k", "grad_norm", "skipped", "eval_reward"]
    csv_path = out / "metrics.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        if 0 in eval_at:
            writer.writerow({"step": 0, "eval_reward": eval_at[0]})
        for h in history:
            writer.writerow({**h, "eval_reward": eval_at.get(h["step"], "")})
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps({"config": config, "history": list(history),
                                     "evals": list(evals)}, indent=1))
    return csv_path, json_path
