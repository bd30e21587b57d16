"""The memory planner: its estimate against measured peak RSS, the chooser, the probe's side effects
and the --memory-budget flag."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import ROOT
from alignprop_core.cli import main
from alignprop_core.config import LoraConfig, MemoryConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import has_lora, lora_state_dict
from alignprop_core.models.backend import diffusers_backend
from alignprop_core.models.tiny_model import build_tiny_model, ensure_tiny_model_dir
from alignprop_core.planning import GB, Setting, StepCosts, choose_plan, estimate_peak, plan_memory
from alignprop_core.rewards import make_reward
from alignprop_core.training.run import TrainRun

WORKER = Path(__file__).resolve().parent / "planner_worker.py"
MiB = 2 ** 20


def _worker(payload: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(payload)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_estimate_is_within_20_percent_of_measured_peak_rss(model):
    """Probed at K = 1, 2, 3 and batch 1, 2; predicted at K = 4, batch 4, with and without
    checkpointing, each measured in its own process."""
    costs = StepCosts(**{**_worker({"model": model, "mode": "probe"}), "baseline": 0})
    for checkpoint in (True, False):
        estimate = estimate_peak(costs, Setting(4, 4, 1, checkpoint, checkpoint))
        measured = _worker({"model": model, "mode": "train", "k": 4, "batch": 4, "checkpoint": checkpoint})["peak"]
        print(f"{model} K=4 B=4 checkpoint={checkpoint}: estimate {estimate / MiB:.1f} MiB, "
              f"measured {measured / MiB:.1f} MiB ({estimate / measured:.2f}x)")
        assert 0.8 <= estimate / measured <= 1.2, (checkpoint, estimate / MiB, measured / MiB)


def _costs() -> StepCosts:
    return StepCosts(baseline=4 * GB, fixed=GB // 2, per_sample=GB, latent=GB // 64, denoiser_step=2 * GB,
                     decode=GB)


def test_the_chooser_picks_the_fastest_plan_that_fits():
    sampler, cfg = SamplerConfig(steps=20, k=2, checkpoint_unet=True), TrainConfig(batch_size=4)
    roomy = choose_plan(_costs(), sampler, cfg, 1000 * GB)
    assert roomy.chosen.setting == Setting(2, 4, 1, False, False)  # everything fits: no recomputation
    plan = choose_plan(_costs(), sampler, cfg, 16 * GB)
    fits = [c for c in plan.candidates if c.peak * 1.1 <= 16 * GB]
    assert plan.chosen.time == min(c.time for c in fits) and plan.chosen.fits
    assert all(c.time >= plan.chosen.time for c in plan.candidates if c.fits)
    assert plan.chosen.setting != roomy.chosen.setting  # the budget binds
    chosen = plan.chosen.setting
    new_sampler, new_cfg = plan.apply(sampler, cfg)
    assert (new_cfg.batch_size, new_cfg.grad_accum) == (chosen.batch, chosen.grad_accum)
    assert (new_sampler.checkpoint_unet, new_sampler.checkpoint_vae) == (chosen.checkpoint_unet,
                                                                         chosen.checkpoint_vae)
    assert new_cfg.batch_size * new_cfg.grad_accum == 4 and new_sampler.k == 2
    assert "<- chosen" in plan.describe() and "(asked)" in plan.describe()


def test_the_chooser_refuses_with_the_smallest_estimate():
    # batch 1 x 4, both checkpointed: 4 + 0.5 + 1 + 2 * (1/64) + 2 GB
    with pytest.raises(ValueError, match=r"smallest estimate is 7\.53 GB \(1 x 4, ckpt unet\+vae.*Lower K"):
        choose_plan(_costs(), SamplerConfig(steps=20, k=2), TrainConfig(batch_size=4), 6 * GB)


def test_offloading_the_reward_is_chosen_only_where_its_weights_make_the_difference():
    sampler, cfg = SamplerConfig(steps=20, k=2), TrainConfig(batch_size=1)
    costs = dataclasses.replace(_costs(), reward_weights=GB)
    on = Setting(2, 1, 1, True, True, True)
    # scoring phase: 4 + 0.5 + 1 + 2/64 GB; chain phase: the whole estimate without the reward's 1 GB
    full = estimate_peak(costs, dataclasses.replace(on, offload_reward=False))
    assert estimate_peak(costs, on) == max(full - GB, 4 * GB + GB // 2 + GB + 2 * (GB // 64))
    # 7.53 GB plus headroom does not fit 8 GB, the 6.53 GB of the offloaded plan does
    plan = choose_plan(costs, sampler, cfg, 8 * GB)
    assert plan.chosen.setting == on and plan.apply(sampler, cfg)[1].offload_reward
    assert plan.chosen.time > min(c.time for c in plan.candidates)  # moving the weights is not free
    # with room to spare the faster plan without offloading wins; nothing to offload: never offered
    assert not choose_plan(costs, sampler, cfg, 1000 * GB).chosen.setting.offload_reward
    assert not any(c.setting.offload_reward for c in choose_plan(_costs(), sampler, cfg, 1000 * GB).candidates)
    # without denoiser checkpointing the reward scores beside every window step: no offload candidate
    assert not any(c.setting.offload_reward and not c.setting.checkpoint_unet
                   for c in choose_plan(costs, sampler, cfg, 1000 * GB).candidates)


def test_the_reward_weights_counted_are_those_on_the_training_device():
    from alignprop_core.planning.probe import reward_weight_bytes
    from alignprop_core.rewards.base import FunctionReward
    from alignprop_core.rewards.spec import RewardSpec

    shared = torch.nn.Linear(8, 4)  # 36 float32 numbers
    head = torch.nn.BatchNorm1d(4)  # 8 parameters and 2 running-stat buffers of 4, one counter
    reward = FunctionReward(RewardSpec.parse("smoothness"), lambda images, prompts: images.mean((1, 2, 3)),
                            modules=[shared, head, shared])
    on_meta = FunctionReward(reward.spec, reward.fn, modules=[m.to("meta") for m in (shared, head)])
    assert reward_weight_bytes(reward, torch.device("cpu")) == 0  # parking on the CPU frees nothing
    assert reward_weight_bytes(on_meta, torch.device("meta")) == 4 * (36 + 8 + 8) + 8
    assert reward_weight_bytes(on_meta, torch.device("cuda")) == 0  # not on that device


def test_settings_without_a_measured_denoiser_step_are_left_out():
    costs = dataclasses.replace(_costs(), denoiser_step=None, decode=None)
    plan = choose_plan(costs, SamplerConfig(steps=20, k=2), TrainConfig(batch_size=2), 1000 * GB)
    assert all(c.setting.checkpoint_unet and c.setting.checkpoint_vae for c in plan.candidates)


def _lora_after_two_steps(sampler, cfg, memory=None):
    backend = diffusers_backend(build_tiny_model(0))
    reward, prompts, lora = make_reward("smoothness"), ["a red cat", "a blue dog"], LoraConfig(rank=2)
    if memory is not None:
        plan = plan_memory(backend, reward, prompts, sampler, lora, cfg, memory)
        assert not has_lora(backend.lora_target)
        sampler, cfg = plan.apply(sampler, cfg)
    run = TrainRun(backend, reward, prompts, prompts, sampler, lora, cfg)
    run.step()
    run.step()
    return (sampler, cfg), lora_state_dict(backend.lora_target)


def test_the_probe_leaves_the_run_as_it_would_be(one_thread):
    sampler = SamplerConfig(steps=3, k=2, checkpoint_unet=False, checkpoint_vae=False)
    cfg = TrainConfig(reward="smoothness", batch_size=2, width=32, height=32, eval_every=0)
    torch.manual_seed(7)
    (planned_sampler, planned_cfg), planned = _lora_after_two_steps(sampler, cfg, MemoryConfig(budget_gb=64.0))
    torch.manual_seed(7)
    _, by_hand = _lora_after_two_steps(planned_sampler, planned_cfg)
    assert planned.keys() == by_hand.keys()
    assert all(torch.equal(planned[k], by_hand[k]) for k in planned)


def test_memory_budget_flag_prints_the_plan(tmp_path, capsys):
    model_dir = ensure_tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompts), "--eval-prompts", str(prompts),
            "--out", str(tmp_path / "run"), "--reward", "smoothness", "--sampler-steps", "3", "--sampler-k", "2",
            "--steps", "1", "--batch-size", "2", "--width", "16", "--height", "16", "--eval-every", "0",
            "--threads", "1", "--memory-budget", "64"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "memory plan: budget 64.00 GB" in captured.err and "<- chosen" in captured.err
    assert json.loads(captured.out)["memory_plan"]
    assert main([*argv[:-1], "0.000001", "--overwrite"]) == 2
    assert "no setting fits the memory budget" in capsys.readouterr().err
