"""bench.live_view runs end to end at a tiny size and writes its row (no timing is asserted here)."""
from __future__ import annotations

import json

from bench import live_view


def test_the_live_view_bench_writes_a_row(tmp_path):
    assert live_view.main(["--steps", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "live_view.json").read_text())
    assert row["model"] == "tiny" and row["train_steps"] == 2 and len(row["raw"]["on"]) == 1
    assert row["ratio"] > 0 and row["messages_per_run"] >= 1 and row["target"] == live_view.TARGET
