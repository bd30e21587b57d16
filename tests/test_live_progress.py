"""The live view's run state (alignprop_core.training.live): throttled messages that carry only new
points and add up to the whole run, the smoothed curve, the ETA, JSON-safe values; and the
trainer's on_save hook that tells it which LoRA file was written last."""
from __future__ import annotations

import json
import math

import pytest
import torch

from alignprop_core.rewards import make_reward
from alignprop_core.training.live import LiveRun
from alignprop_core.training.trainer import train
from test_trainer import EVAL, PROMPTS, _configs
from tiny_models import make_backend


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _replay(run: LiveRun, messages: list[dict]) -> dict:
    """What a viewer holds after applying `messages` in order, as the frontend extension does."""
    held = {"points": [], "evals": []}
    for message in messages:
        assert message["points_from"] == len(held["points"]) and message["evals_from"] == len(held["evals"])
        held["points"] += message["points"]
        held["evals"] += message["evals"]
    return held


def test_messages_are_throttled_and_add_up_to_the_whole_run():
    clock = Clock()
    run = LiveRun("r1", total=100, min_interval=0.5, clock=clock)
    messages = []
    run.add_eval(0, -1.0)
    for step in range(1, 101):
        clock.now += 0.1  # ten steps a second
        run.add_step(step, math.sin(step))
        if step % 25 == 0:
            run.add_eval(step, step / 100)
        if run.due():
            messages.append(run.message())
    run.finish("finished")
    assert run.due()
    messages.append(run.message())
    seconds = 10.0
    assert len(messages) <= seconds * 2 + 2  # at most two a second, plus the final one
    assert len(messages) >= seconds * 1.5  # and they keep flowing: one about every 0.5 s
    held = _replay(run, messages)
    state = run.state()
    assert held["points"] == state["points"] and held["evals"] == state["evals"]
    assert [p[0] for p in state["points"]] == list(range(1, 101))
    assert state["evals"] == [[0, -1.0], [25, 0.25], [50, 0.5], [75, 0.75], [100, 1.0]]
    assert messages[-1]["status"] == "finished" and messages[-1]["eta_s"] == 0.0
    assert max(len(m["points"]) for m in messages) <= 6  # each message carries only the new points


def test_smoothing_is_the_bias_corrected_moving_average_and_skips_non_finite_rewards():
    run = LiveRun("r", total=5, smoothing=0.5, clock=Clock())
    for step, value in enumerate([1.0, 3.0, float("nan"), 5.0], start=1):
        run.add_step(step, value)
    # EMA with weight 0.5, divided by 1 - 0.5^n: 1; (0.25+1.5)/0.75; unchanged; ...
    first, second = 1.0, (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75
    third = (0.5 * (0.5 * 0.5 * 1.0 + 0.5 * 3.0) + 0.5 * 5.0) / 0.875
    assert run.points[0] == [1, 1.0, pytest.approx(first)]
    assert run.points[1][2] == pytest.approx(second)
    assert run.points[2] == [3, None, pytest.approx(second)]  # a skipped step is null, not NaN
    assert run.points[3][2] == pytest.approx(third)
    run.add_eval(4, float("inf"))
    json.dumps(run.state(), allow_nan=False)  # what the websocket and the route send: strict JSON
    unsmoothed = LiveRun("r", total=2, smoothing=0.0, clock=Clock())
    unsmoothed.add_step(1, 2.0)
    unsmoothed.add_step(2, 7.0)
    assert [p[2] for p in unsmoothed.points] == [2.0, 7.0]


def test_eta_follows_the_rate_so_far_and_counts_from_a_resumed_step():
    clock = Clock()
    run = LiveRun("r", total=10, clock=clock)
    assert run.eta_s() is None
    for step in range(1, 6):
        clock.now += 2.0
        run.add_step(step, 0.0)
    assert run.eta_s() == pytest.approx(10.0)  # 5 steps left at 2 s each
    resumed = LiveRun("r", total=10, clock=clock)
    clock.now += 3.0
    resumed.add_step(8, 0.0)  # a resumed run: steps 1-7 were done before
    assert resumed.eta_s() == pytest.approx(6.0)


def test_preview_and_lora_path_are_sent_once_each_change():
    clock = Clock()
    run = LiveRun("r", total=4, min_interval=0.0, clock=clock)
    run.set_preview({"filename": "a.png", "step": 1})
    run.set_lora("/loras/x-step00001.safetensors")
    first = run.message()
    assert first["preview"]["filename"] == "a.png" and first["lora_path"].endswith("step00001.safetensors")
    second = run.message()
    assert "preview" not in second and "lora_path" not in second
    run.set_preview({"filename": "b.png", "step": 2})
    assert run.message()["preview"]["filename"] == "b.png"
    assert run.state()["preview"]["filename"] == "b.png"


@pytest.mark.parametrize("kwargs,match", [({"smoothing": 1.0}, "smoothing"), ({"smoothing": -0.1}, "smoothing")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiveRun("r", total=1, **kwargs)


def test_finish_takes_only_an_end_status():
    run = LiveRun("r", total=1)
    with pytest.raises(ValueError, match="finished"):
        run.finish("running")
    run.finish("failed", "out of memory")
    assert run.state()["status"] == "failed" and run.state()["error"] == "out of memory"


def test_on_save_gets_every_lora_file_the_trainer_writes(tmp_path):
    sampler, lora, cfg = _configs(steps=4, save_every=2, eval_every=0)
    saved = []
    result = train(make_backend(torch.float32), make_reward("color_target"), PROMPTS, EVAL, sampler, lora, cfg,
                   out_dir=tmp_path, lora_name="run", on_save=saved.append)
    # the best LoRA is written at the step-0 evaluation, and again at step 4's if that one is better
    improved = result.evals[1]["eval_reward"] > result.evals[0]["eval_reward"]
    assert [p.name for p in saved] == ["run-best.safetensors", "run-step00002.safetensors",
                                       *["run-best.safetensors"] * improved, "run-step00004.safetensors",
                                       "run.safetensors"]
    assert saved[-1] == result.lora_path and all(p.is_file() for p in saved)
