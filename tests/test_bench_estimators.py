"""Item 6 of the bench (DRaFT-LV against truncated K=1): the bookkeeping that the report's verdict
rests on (queries per step, seconds, the goal and when it is reached) and the rendered section."""
from __future__ import annotations

import dataclasses
import statistics

from bench import estimators


def _curve(points):
    return [{"queries": q, "train_s": s, "reward": r} for q, s, r in points]


def test_the_goal_is_truncated_at_its_budget_and_the_fraction_is_draft_lv_time_to_it(monkeypatch):
    runs = {"truncated": [_curve([(0, 0, 0.0), (8, 10, 0.5), (16, 20, 1.0)]),
                          _curve([(0, 0, 0.0), (8, 12, 0.3), (16, 24, 0.5)])],
            "draft_lv": [_curve([(0, 0, 0.0), (24, 6, 1.0), (48, 12, 1.2)]),
                         _curve([(0, 0, 0.0), (24, 8, 0.5), (48, 16, 1.0)])]}
    monkeypatch.setattr(estimators, "_seed_pair",
                        lambda spec, seed: {k: v[seed] for k, v in runs.items()})
    res = estimators.run(estimators.EstimatorSpec(seeds=(0, 1)))
    assert res["goal"] == {"queries": 16, "train_s": 22, "reward": 0.75}  # point-wise medians
    assert res["draft_lv_reach"] == {"queries": 24, "train_s": 7, "reward": 0.75}  # reached, not passed
    assert res["wall_fraction"] == 7 / 22 and res["met"]
    monkeypatch.setattr(estimators, "TARGET_WALL_FRACTION", 0.1)
    assert estimators.run(estimators.EstimatorSpec(seeds=(0, 1)))["met"] is False


def test_no_verdict_when_truncated_ends_at_or_below_its_start(monkeypatch):
    """A goal below the untrained start would be 'reached' at zero queries: that is no comparison."""
    down = _curve([(0, 0, 0.0), (8, 10, -0.5)])
    monkeypatch.setattr(estimators, "_seed_pair", lambda spec, seed: {"truncated": down, "draft_lv": down})
    res = estimators.run(estimators.EstimatorSpec(seeds=(0,)))
    assert res["met"] is None and res["draft_lv_reach"] is None and not res["truncated_improved"]
    from bench.report import estimators_section, summary_table
    assert "nothing to reach" in "\n".join(estimators_section(res))
    assert "no verdict" in summary_table({"estimators": [res]})[-1]


def test_a_quick_run_on_the_tiny_model_counts_n_plus_1_queries_per_image_and_renders():
    spec = estimators.quick(estimators.EstimatorSpec(model="tiny", reward="smoothness", steps=2,
                                                     batch=2, lora_rank=2, lr=1e-2))
    spec = dataclasses.replace(spec, budget=4, eval_every=1, eval_prompts=2)
    res = estimators.run(spec)
    trunc, lv = res["runs"]["truncated"][0], res["runs"]["draft_lv"][0]
    assert [c["queries"] for c in trunc] == [0, 2, 4] and [c["queries"] for c in lv] == [0, 6, 12]
    assert trunc[0]["reward"] == lv[0]["reward"]  # same weights, prompts and evaluation latents
    assert trunc[-1]["reward"] != lv[-1]["reward"]  # the estimators train differently
    assert all(b["train_s"] > a["train_s"] for a, b in zip(trunc, trunc[1:]))
    assert res["median"]["truncated"][-1]["reward"] == statistics.median([trunc[-1]["reward"]])

    from bench.report import estimators_section, summary_table
    text = "\n".join(estimators_section(res))
    assert "| truncated, K=1 | 2 | 4 |" in text and "| DRaFT-LV, n=2 | 2 | 12 |" in text
    row = [r for r in summary_table({"estimators": [res]}) if "DRaFT-LV (n=2)" in r]
    assert len(row) == 1 and "`smoothness`" in row[0]
