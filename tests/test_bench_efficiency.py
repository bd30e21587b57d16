"""Bench item 4's bookkeeping (not its numbers): AlignProp and DDPO start from the same weights and
evaluator, the median curve and the query counts are what the report states, and a 0-query
crossing is not mistaken for "never"."""
from __future__ import annotations

import statistics

import pytest

from bench import efficiency


def _curve(rewards: list[float], step: int = 8) -> list[dict]:
    return [{"queries": i * step, "reward": r, "train_reward": r - 1, "wall_s": 1.0}
            for i, r in enumerate(rewards)]


def test_queries_to_reach_counts_a_start_already_at_the_level_as_zero_not_never():
    curve = _curve([-2.0, -2.5, -1.0])
    assert efficiency.queries_to_reach(curve, -2.0) == 0
    assert efficiency.queries_to_reach(curve, -1.5) == 16
    assert efficiency.queries_to_reach(curve, 0.0) is None
    assert efficiency.queries_to_reach(curve, -3.0, key="train_reward") == 0
    assert efficiency.queries_to_reach(curve, -2.2, key="train_reward") == 16


def test_median_curve_takes_the_pointwise_median_of_every_metric():
    runs = [_curve([-2.0, -1.0]), _curve([-2.0, -3.0]), _curve([-2.0, -1.5])]
    med = efficiency.median_curve(runs)
    assert [m["queries"] for m in med] == [0, 8]
    assert med[1]["reward"] == -1.5 and med[1]["train_reward"] == -2.5


def test_crossing_needs_ddpo_to_improve_and_25x_fewer_queries():
    dd = [{"queries": 0, "reward": -2.0}, {"queries": 1024, "reward": -1.5}]
    fast = _curve([-2.0, -1.4])  # reaches -1.5 at 8 queries: 128x fewer
    slow = _curve([-2.0, -1.9, -1.8, -1.7, -1.6, -1.5], step=64)  # at 320: 3.2x
    got = efficiency._crossing(fast, [fast, slow], dd, 1024, "reward")
    assert got["alignprop_queries_needed"] == 8 and got["factor"] == 128 and got["met"]
    assert got["alignprop_queries_per_seed"] == [8, 320]
    assert not efficiency._crossing(slow, [slow], dd, 1024, "reward")["met"]
    worse = [{"queries": 0, "reward": -2.0}, {"queries": 1024, "reward": -2.5}]
    flat = efficiency._crossing(fast, [fast], worse, 1024, "reward")
    assert flat["alignprop_queries_needed"] == 0 and not flat["ddpo_improved"] and not flat["met"]


def test_the_baseline_is_the_ddpo_run_with_the_highest_reward_at_the_budget_not_on_the_way():
    peaky = {"lr": 3e-2, "curve": _curve([-2.0, -1.0, -2.4])}  # best on the way, collapsed by the end
    steady = {"lr": 1e-2, "curve": _curve([-2.0, -1.9, -1.8])}
    tie = {"lr": 5e-3, "curve": _curve([-2.0, -1.7, -1.8])}
    assert efficiency.strongest_ddpo([peaky, steady]) is steady
    assert efficiency.strongest_ddpo([steady, tie]) is steady  # a tie keeps the earlier entry
    for empty in ("ddpo_lrs", "ddpo_seeds", "alignprop_seeds"):
        with pytest.raises(ValueError, match=f"{empty} is empty"):
            efficiency.run(efficiency.EfficiencySpec(**{empty: ()}))


def test_train_subset_spreads_over_the_list():
    prompts = [f"p{i}" for i in range(108)]
    sub = efficiency.train_subset(prompts, 36)
    assert len(sub) == 36 and sub[:3] == ["p0", "p3", "p6"] and len(set(sub)) == 36
    assert efficiency.train_subset(prompts, 0) == []
    assert efficiency.train_subset(prompts[:5], 36) == prompts[:5]


def test_eval_latents_score_every_held_out_prompt_that_often_and_the_training_subset_once():
    spec = efficiency.EfficiencySpec(reward="toy_count", eval_prompts=3, eval_latents=2)
    _, held_out = efficiency.prompt_lists(spec)
    assert len(held_out) == 3
    sampler, tcfg = efficiency._eval_configs(spec)
    assert tcfg.eval_latents == 2
    seen = []

    def fake_evaluate(backend, reward_fn, prompts, sampler, train):
        seen.append((list(prompts), train.eval_latents))
        return [float(len(p)) for p in prompts] * train.eval_latents, None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(efficiency, "evaluate", fake_evaluate)
        out = efficiency._scorer(None, None, sampler, tcfg, held_out, ["a", "bb"])()
    assert seen == [(held_out, 2), (["a", "bb"], 1)]
    assert out["train_reward"] == 1.5


def test_auto_prompts_are_the_toy_lists_for_the_toy_world_or_a_toy_reward():
    toy_train, toy_eval = efficiency.prompt_lists(efficiency.EfficiencySpec(
        model="alignprop_core/data/toy_world", reward="jpeg_compressibility", eval_latents=1))
    assert "background" in toy_train[0] and "background" in toy_eval[0]
    assert efficiency.prompt_lists(efficiency.EfficiencySpec(model="tiny", reward="toy_count"))[0] == toy_train
    animals, _ = efficiency.prompt_lists(efficiency.EfficiencySpec(model="tiny", reward="color_target"))
    assert not any("background" in p for p in animals)


@pytest.mark.usefixtures("one_thread")
def test_run_end_to_end_on_the_tiny_model(tmp_path):
    """Both methods start from the same weights under the same evaluator, both curves carry the
    training-prompt reward, the median is the median of the seeds, and the report and plot render."""
    spec = efficiency.EfficiencySpec(model="tiny", reward="color_target", steps=2, k_min=1, k_max=1,
                                     alignprop_seeds=(0, 1), alignprop_queries=4, alignprop_batch=2,
                                     alignprop_eval_every=1, ddpo_queries=32, ddpo_eval_every=32,
                                     eval_prompts=2, eval_latents=2, train_eval_prompts=2, lora_rank=2,
                                     ddpo_lrs=(3e-3, 3e-1), ddpo_seeds=(0, 1, 2))
    res = efficiency.run(spec)
    runs, dd = res["alignprop_runs"], res["ddpo"]
    sweep = res["ddpo_sweep"]
    assert [r["lr"] for r in sweep] == [3e-3, 3e-1] and sweep[0]["curve"] != sweep[1]["curve"]
    assert dd == max((r["curve"] for r in sweep), key=lambda c: c[-1]["reward"])  # the strongest DDPO
    assert res["ddpo_lr"] == next(r["lr"] for r in sweep if r["curve"] is dd)
    for r in sweep:  # each lr: one run per seed, judged by their point-wise median
        finals = [c[-1]["reward"] for c in r["runs"]]
        assert len(finals) == 3 and len(set(finals)) == 3  # the seeds differ
        assert r["curve"][-1]["reward"] == statistics.median(finals)
    assert res["ddpo_runs"] is next(r["runs"] for r in sweep if r["curve"] is dd)
    assert [c["queries"] for c in runs[0]] == [0, 2, 4] and [c["queries"] for c in dd] == [0, 32]
    assert len({round(c[0]["reward"], 6) for c in (*runs, dd)}) == 1  # same weights, latents, prompts
    assert len({round(c[0]["train_reward"], 6) for c in (*runs, dd)}) == 1
    assert runs[0][-1]["reward"] != runs[0][0]["reward"]  # the LoRA trained
    assert res["alignprop"][-1]["reward"] == statistics.median(r[-1]["reward"] for r in runs)
    assert res["train_prompts"]["ddpo_final"] == dd[-1]["train_reward"]

    from bench import plots
    from bench.report import efficiency_section
    text = "\n".join(efficiency_section(res))
    assert "## 4. Sample efficiency" in text and "Training-prompt column" in text
    assert "lr 0.003: " in text and "lr 0.3: " in text  # every DDPO run of the sweep is reported
    assert "| DDPO, median of 3 |" in text and "3 seeds (0, 1, 2) for each learning rate" in text
    assert plots.efficiency(res, tmp_path).stat().st_size > 0

    # a second reward renders as its own section, plot and summary row
    from bench.report import render, summary_table
    results = {"machine": {"cpu": "test", "cores": 2, "torch": "x", "device": "cpu", "threads": 1,
                           "python": "3", "load_start": [0, 0, 0]},
               "quick": True, "load_end": [0, 0, 0], "minutes": 1.0, "efficiency": res,
               "efficiency_more": [res | {"spec": res["spec"] | {"reward": "smoothness"}}]}
    page = render(results)
    assert "### 4b. Again with `smoothness`, AlignProp lr 0.0015, K 1, reward augmentation none" in page
    assert "(sample_efficiency_smoothness.png)" in page
    rows = [r for r in summary_table(results) if "reward queries for AlignProp to reach" in r]
    assert len(rows) == 2 and "`smoothness`" in rows[1]


def test_lora_targets_reach_both_methods_and_the_report():
    """spec.lora_targets is the LoRA of AlignProp and DDPO alike, a res-block-only LoRA trains, and the
    report names a LoRA that is not the attention default."""
    from dataclasses import replace

    from bench.report import alignprop_setting, efficiency_section

    spec = efficiency.EfficiencySpec(model="tiny", reward="color_target", steps=2, k_min=1, k_max=1,
                                     alignprop_queries=4, alignprop_batch=2, alignprop_eval_every=2,
                                     ddpo_queries=8, ddpo_eval_every=8, eval_prompts=2, eval_latents=1,
                                     train_eval_prompts=0, lora_rank=2, lora_targets=("conv1", "conv2"))
    assert efficiency._lora_config(spec).target_modules == ("conv1", "conv2")
    ap = efficiency.run_alignprop(spec)
    dd = efficiency.run_ddpo(spec, 3e-1)
    assert ap[-1]["reward"] != ap[0]["reward"] and dd[-1]["reward"] != dd[0]["reward"]
    assert ap[0]["reward"] == pytest.approx(dd[0]["reward"], abs=1e-6)
    as_dict = vars(spec) | {"seed": 0}
    assert alignprop_setting(as_dict).endswith("LoRA on `conv1`, `conv2`")
    default = vars(replace(spec, lora_targets=("to_q", "to_k", "to_v", "to_out.0")))
    assert "LoRA on" not in alignprop_setting(default)
    res = {"spec": as_dict, "alignprop": ap, "alignprop_runs": [ap], "ddpo": dd, "ddpo_lr": 3e-1,
           "ddpo_sweep": [{"lr": 3e-1, "curve": dd, "runs": [dd]}], "ddpo_final": dd[-1]["reward"],
           "ddpo_best": max(c["reward"] for c in dd), "ddpo_improved": True, "alignprop_queries_needed": None,
           "alignprop_queries_per_seed": [None], "alignprop_queries_to_ddpo_best": None, "factor": None,
           "met": False, "target_factor": 25}
    assert "rank-2 LoRA on `conv1`, `conv2` and are evaluated" in "\n".join(efficiency_section(res))
