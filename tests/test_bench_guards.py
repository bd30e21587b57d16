"""The guards study (bench/guards.py): the medians, the seeds whose blob accuracy fell, the verdict
against the goal, and the rendered table; on made-up runs, so the bookkeeping is checked exactly."""
from __future__ import annotations

from bench import guards


def _run(setting: str, seed: int, gain: float, blobs_delta: float, start=(-2.0, 0.5, 0.2)) -> dict:
    reward, blobs, diversity = start
    evals = [{"step": 0, "eval_reward": reward, "judges": {"toy_blobs": blobs}, "diversity": diversity},
             {"step": 50, "eval_reward": reward + gain, "judges": {"toy_blobs": blobs + blobs_delta},
              "diversity": diversity - 0.01}]
    return {"setting": setting, "seed": seed, "evals": evals, "step_s": 1.0 + seed}


SETTINGS = [guards.Setting("no guard"), guards.Setting("pull 1", kl_weight=1.0),
            guards.Setting("L2 1", lora_l2_weight=1.0)]


def test_the_verdict_needs_every_seed_at_or_above_its_blob_start_and_90_percent_of_the_gain():
    runs = [_run("no guard", 0, 0.4, 0.1), _run("no guard", 1, 0.6, -0.05), _run("no guard", 2, 0.5, 0.0),
            # keeps 0.46 / 0.5 = 92% of the median gain, no seed below its blob start: met
            _run("pull 1", 0, 0.46, 0.0), _run("pull 1", 1, 0.5, 0.02), _run("pull 1", 2, 0.3, 0.05),
            # keeps more gain, but one seed ends with fewer correct blobs: missed
            _run("L2 1", 0, 0.6, 0.1), _run("L2 1", 1, 0.6, -0.01), _run("L2 1", 2, 0.6, 0.1)]
    summary = guards.summarise(SETTINGS, runs)
    base, pull, l2 = summary["rows"]
    assert base["reward_gain"] == 0.5 and base["seeds_blobs_below_start"] == 1 and "met" not in base
    assert base["blobs_delta"] == 0.0 and base["step_s"] == 2.0
    assert abs(pull["gain_kept"] - 0.92) < 1e-9 and pull["seeds_blobs_below_start"] == 0 and pull["met"]
    assert l2["gain_kept"] > 1 and l2["seeds_blobs_below_start"] == 1 and l2["met"] is False
    lines = guards.table(summary).splitlines()
    assert len(lines) == 2 + len(SETTINGS)
    assert lines[3].startswith("| pull 1 | -2.000 -> -1.540 | 92% | 0.500 -> 0.520 | 0 of 3 |")
    assert lines[3].endswith("| met |") and lines[4].endswith("| missed |")


def test_no_gain_to_keep_when_the_unguarded_runs_did_not_improve():
    runs = [_run("no guard", 0, -0.1, 0.0), _run("pull 1", 0, 0.2, 0.0), _run("L2 1", 0, 0.1, 0.0)]
    rows = guards.summarise(SETTINGS, runs)["rows"]
    assert rows[1]["gain_kept"] is None and rows[1]["met"] is False
    assert "| n/a |" in guards.table({"rows": rows})
