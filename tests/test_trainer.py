"""The AlignProp loop on a tiny model: reward rises, runs are reproducible, resume is exact."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import load_lora, lora_parameters, lora_state_dict
from alignprop_core.rewards import Reward, make_reward
from alignprop_core.training.evaluate import evaluate
from alignprop_core.training.step import learning_rate
from alignprop_core.training.trainer import train
from tiny_models import make_backend

PROMPTS = ["a cat", "a dog", "a horse", "a cow", "a fish", "a bird"]
EVAL = ["a fox", "a lion", "a duck", "a goat"]


def _configs(**train_kw):
    sampler = SamplerConfig(steps=4, guidance_scale=3.0, truncation="uniform", k_min=2, k_max=4)
    lora = LoraConfig(rank=4, alpha=4.0)
    kw = dict(reward="color_target", steps=20, batch_size=2, lr=1e-2, width=16, height=16,
              eval_every=10, seed=0)
    kw.update(train_kw)
    return sampler, lora, TrainConfig(**kw)


def _run(out_dir=None, reward=None, **kw):
    backend = make_backend(torch.float32)
    reward = reward if reward is not None else make_reward("color_target")
    sampler, lora, cfg = _configs(**{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__})
    extra = {k: v for k, v in kw.items() if k not in TrainConfig.__dataclass_fields__}
    result = train(backend, reward, PROMPTS, EVAL, sampler, lora, cfg, out_dir=out_dir, **extra)
    return backend, result


def test_reward_rises_on_held_out_prompts_and_base_is_untouched():
    backend = make_backend(torch.float32)
    base = {k: v.clone() for k, v in backend.lora_target.state_dict().items()}
    sampler, lora, cfg = _configs()
    result = train(backend, make_reward("color_target"), PROMPTS, EVAL, sampler, lora, cfg)
    start, end = result.evals[0]["eval_reward"], result.evals[-1]["eval_reward"]
    assert [e["step"] for e in result.evals] == [0, 10, 20]
    assert end > start + 0.05, (start, end)  # measured: -0.695 -> about -0.59
    # base weights bit-identical; only LoRA parameters are trainable
    lora_names = {n for n, _ in lora_parameters(backend.lora_target)}
    for name, p in backend.lora_target.named_parameters():
        if name not in lora_names:
            assert not p.requires_grad, name
    after = backend.lora_target.state_dict()
    for key, value in base.items():
        # peft moves a wrapped Linear's weights under `.base_layer`
        stem, _, leaf = key.rpartition(".")
        live_key = key if key in after else f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[live_key], value), key


def test_eval_latents_scores_each_held_out_prompt_on_its_own_latents():
    backend = make_backend(torch.float32)
    sampler, _, one = _configs(eval_batch_size=3)
    three = dataclasses.replace(one, eval_latents=3)
    reward = make_reward("color_target")
    s1, im1 = evaluate(backend, reward, EVAL, sampler, one, return_images=True)
    s3, im3 = evaluate(backend, reward, EVAL, sampler, three, return_images=True)
    n = len(EVAL)
    assert len(s1) == n and len(s3) == 3 * n and im3.shape[0] == 3 * n
    # the first latent of each prompt is the one eval_latents=1 uses (up to float rounding: the
    # batches are cut differently); the others are new draws
    torch.testing.assert_close(im3[:n], im1, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(s3[:n]), torch.tensor(s1), atol=1e-5, rtol=0)
    for k in (1, 2):
        assert (im3[k * n:(k + 1) * n] - im1).abs().amax() > 0.05
    # and train() averages the held-out reward over all of them
    result = train(backend, reward, PROMPTS, EVAL, sampler, LoraConfig(rank=4, alpha=4.0),
                   dataclasses.replace(three, steps=1, eval_every=0))
    assert math.isclose(result.evals[0]["eval_reward"], sum(s3) / len(s3), rel_tol=1e-6)


def test_same_seed_gives_identical_lora_and_other_seed_differs():
    a, _ = _run(steps=4)
    b, _ = _run(steps=4)
    c, _ = _run(steps=4, seed=1)
    sa, sb, sc = (lora_state_dict(x.lora_target) for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_is_exact(tmp_path):
    schedule = dict(steps=20, lr_schedule="cosine", lr_warmup_steps=4)  # the schedule resumes too
    full, full_result = _run(tmp_path / "full", **schedule)
    _run(tmp_path / "half", save_every=10, should_stop=_stop_after(10), **schedule)
    resumed, resumed_result = _run(tmp_path / "resumed", resume_from=tmp_path / "half" / "train_state.pt",
                                   **schedule)
    sa, sb = lora_state_dict(full.lora_target), lora_state_dict(resumed.lora_target)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["reward"] for h in resumed_result.history] == [h["reward"] for h in full_result.history]
    assert [h["lr"] for h in resumed_result.history] == [h["lr"] for h in full_result.history]
    assert resumed_result.evals == full_result.evals


def test_learning_rate_schedules():
    def lrs(**kw):
        cfg = TrainConfig(lr=1.0, steps=10, **kw)
        return [learning_rate(cfg, s) for s in range(10)]

    assert lrs() == [1.0] * 10
    assert lrs(lr_warmup_steps=4) == [0.25, 0.5, 0.75] + [1.0] * 7
    assert lrs(lr_schedule="linear", lr_warmup_steps=2) == pytest.approx(
        [0.5, 1.0] + [1 - i / 8 for i in range(8)])
    cosine = lrs(lr_schedule="cosine")
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


def test_the_scheduled_learning_rate_is_the_one_applied():
    # Adam moves each weight by about lr per step, so a 100-step warm-up (lr/100, 2 lr/100) moves the
    # LoRA about 1/70 as far in two steps as the constant learning rate does
    moved = {}
    for warmup in (0, 100):
        backend, result = _run(steps=2, eval_every=0, lr_warmup_steps=warmup)
        moved[warmup] = sum(float(v.abs().sum()) for k, v in lora_state_dict(backend.lora_target).items()
                            if "lora_B" in k)  # B starts at zero
        assert [h["lr"] for h in result.history] == ([1e-2, 1e-2] if warmup == 0 else [1e-4, 2e-4])
    assert 0 < moved[100] < 0.05 * moved[0], moved


def test_resume_restores_a_standardised_mixture_exactly(tmp_path):
    def mixture():
        return make_reward("mixture", spec="smoothness:1, color_target:0.5", standardize=True)

    full_reward, resumed_reward = mixture(), mixture()
    full, full_result = _run(tmp_path / "full", reward=full_reward, steps=6, eval_every=3)
    _run(tmp_path / "half", reward=mixture(), steps=6, eval_every=3, save_every=3,
         should_stop=_stop_after(3))
    resumed, _ = _run(tmp_path / "resumed", reward=resumed_reward, steps=6, eval_every=3,
                      resume_from=tmp_path / "half" / "train_state.pt")
    sa, sb = lora_state_dict(full.lora_target), lora_state_dict(resumed.lora_target)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full_reward.state_dict() == resumed_reward.state_dict()
    # the step-0 evaluation initialises the statistics, later evaluations do not move them
    assert full_reward.state_dict()["batches"] == 1 + 6


def _stop_after(n):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > n

    return should_stop


def test_stop_still_writes_a_loadable_lora(tmp_path):
    backend, result = _run(tmp_path, steps=20, should_stop=_stop_after(3))
    assert result.stopped_early and len(result.history) == 3
    lora = load_lora(result.lora_path)
    assert lora.metadata["alignprop.step"] == "3"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_truncation_is_drawn_once_per_batch():
    backend = make_backend(torch.float32)
    inner = backend.denoiser
    calls: list[bool] = []

    def recording(x, t, cond):
        calls.append(torch.is_grad_enabled())
        return inner(x, t, cond)

    backend.denoiser = recording
    steps = 6
    sampler = SamplerConfig(steps=steps, guidance_scale=2.0, truncation="uniform", k_min=1, k_max=steps,
                            checkpoint_unet=False)
    cfg = TrainConfig(steps=12, batch_size=1, width=16, height=16, eval_every=0)
    train(backend, make_reward("color_target"), PROMPTS, EVAL, sampler, LoraConfig(), cfg)
    # one evaluation batch (4 held-out prompts) before and after training, `steps` calls each
    train_calls = calls[steps:-steps]
    assert len(train_calls) == cfg.steps * steps
    ks = []
    for b in range(cfg.steps):
        window = train_calls[b * steps:(b + 1) * steps]
        k = sum(window)
        # the gradient window is one contiguous block at the end of the chain
        assert window == [False] * (steps - k) + [True] * k, window
        ks.append(k)
    assert len(set(ks)) > 2, ks


def test_nan_reward_skips_the_step_and_keeps_the_lora():
    backend = make_backend(torch.float32)
    sampler, lora, cfg = _configs(steps=2, eval_every=0)
    good = make_reward("color_target")
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        r = good(images, prompts)
        return r * math.nan if calls["n"] == 2 else r  # the first training batch

    with pytest.warns(UserWarning, match="NaN/Inf"):
        result = train(backend, flaky, PROMPTS, EVAL, sampler, lora, cfg)
    assert result.history[0]["skipped"] and not result.history[1]["skipped"]
    for _, p in lora_parameters(backend.lora_target):
        assert torch.isfinite(p).all()


def test_a_reward_that_is_never_finite_stops_the_run_with_the_cause(tmp_path):
    backend = make_backend(torch.float32)
    sampler, lora, cfg = _configs(steps=20, eval_every=0)
    good = make_reward("color_target")
    calls = {"n": 0}

    def broken(images, prompts):  # fine for the step-0 evaluation, NaN in training
        calls["n"] += 1
        r = good(images, prompts)
        return r if calls["n"] == 1 else r * math.nan

    with pytest.warns(UserWarning, match="NaN/Inf"), \
            pytest.raises(RuntimeError, match=r"NaN/Inf in 5 optimiser steps in a row \(steps 1 to 5\)"):
        train(backend, broken, PROMPTS, EVAL, sampler, lora, cfg, out_dir=tmp_path)
    assert calls["n"] == 1 + 5  # it stopped there, not after 20 steps
    # kept as after any failure: the (untrained) LoRA under the partial name, never the final one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignprop_lora-best.safetensors",
                                                         "alignprop_lora-partial.safetensors", "train_state.pt"]


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[]), "no training prompts"),
    (dict(width=15), "multiples of the VAE factor"),
])
def test_bad_input_is_rejected_before_training(bad, match):
    backend = make_backend(torch.float32)
    sampler, lora, cfg = _configs(**{k: v for k, v in bad.items() if k != "prompts"})
    with pytest.raises(ValueError, match=match):
        train(backend, make_reward("color_target"), bad.get("prompts", PROMPTS), EVAL, sampler, lora, cfg)


def test_bf16_autocast_keeps_lora_in_fp32_and_trains():
    backend, result = _run(steps=2, eval_every=0, mixed_precision="bf16")
    params = [p for _, p in lora_parameters(backend.lora_target)]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(backend.lora_target) if "lora_B" in n)
    assert all(math.isfinite(h["reward"]) for h in result.history)


def test_fp16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="fp16.*needs a CUDA device"):
        _run(steps=1, mixed_precision="fp16")


def test_an_error_from_on_step_still_saves_the_lora_then_propagates(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel_at_3(step, metrics):
        if step == 3 and "eval_reward" not in metrics:
            raise Cancelled()

    with pytest.raises(Cancelled), pytest.warns(UserWarning, match="stopped by Cancelled at step 3"):
        _run(tmp_path, steps=20, on_step=cancel_at_3)
    lora = load_lora(tmp_path / "alignprop_lora-partial.safetensors")
    assert lora.metadata["alignprop.step"] == "3"
    assert (tmp_path / "train_state.pt").exists()
    assert not (tmp_path / "alignprop_lora.safetensors").exists()  # the final name is for finished runs


def test_a_failed_or_stopped_run_never_replaces_a_finished_lora(tmp_path):
    _run(tmp_path, steps=2, eval_every=0)
    finished = (tmp_path / "alignprop_lora.safetensors").read_bytes()

    # overwrite allows replacing it with a finished run, never with an unfinished one
    with pytest.raises(RuntimeError, match="reward broke"), pytest.warns(UserWarning):
        _run(tmp_path, steps=2, eval_every=0, overwrite=True,
             reward=_fails_after_calls(make_reward("color_target"), 1))
    assert (tmp_path / "alignprop_lora.safetensors").read_bytes() == finished
    assert load_lora(tmp_path / "alignprop_lora-partial.safetensors").metadata["alignprop.step"] == "0"
    _, result = _run(tmp_path, steps=5, eval_every=0, overwrite=True, should_stop=_stop_after(1))
    assert result.lora_path.name == "alignprop_lora-partial.safetensors"
    assert (tmp_path / "alignprop_lora.safetensors").read_bytes() == finished


def _fails_after_calls(reward, n):
    calls = {"n": 0}

    def fn(images, prompts):
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("reward broke")
        return reward(images, prompts)

    return fn


@pytest.mark.parametrize("kw, error, message", [
    ({}, FileExistsError, "alignprop_lora.safetensors already exists"),
    ({"lora_name": "x.bin"}, ValueError, "ends in .bin"),
    ({"lora_name": "dir/"}, ValueError, "names a folder"),
    ({"lora_name": "a\nb"}, ValueError, "control character"),
    ({"lora_name": "n" * 300}, ValueError, "300 bytes long"),
])
def test_output_names_are_refused_before_any_work(tmp_path, kw, error, message):
    (tmp_path / "alignprop_lora.safetensors").write_bytes(b"keep me")
    seen = []
    with pytest.raises(error, match=message):
        _run(tmp_path, steps=2, on_step=lambda step, m: seen.append(step), **kw)
    assert seen == []  # not even the step-0 evaluation ran
    assert (tmp_path / "alignprop_lora.safetensors").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignprop_lora.safetensors"]


@pytest.mark.parametrize("where", ["sampling", "reward"])
def test_an_interrupt_inside_a_step_resumes_to_the_uninterrupted_lora(tmp_path, where):
    # Ctrl-C lands anywhere inside step 3: the state saved must not have consumed that step's draws
    def mix():
        return make_reward("mixture", spec="smoothness:1, color_target:0.5", standardize=True)

    full, _ = _run(tmp_path / "full", steps=6, eval_every=3, reward=mix())
    calls = {"n": 0}
    reward = mix()

    class Interrupting(Reward):
        """The mixture, with Ctrl-C pressed during one call; its state is the mixture's."""

        def __call__(self, images, prompts):
            calls["n"] += 1
            if calls["n"] == 4:  # the step-0 evaluation is one call (4 prompts, one batch), steps 1-2 two
                if where == "reward":
                    reward(images, prompts)  # the mixture's statistics move, then the interrupt comes
                raise KeyboardInterrupt
            return reward(images, prompts)

        def state_dict(self):
            return reward.state_dict()

        def load_state_dict(self, state):
            reward.load_state_dict(state)

        def scoring_only(self):
            return reward.scoring_only()

    interrupting = Interrupting(reward.spec)
    with pytest.warns(UserWarning, match="interrupted at step 2"):
        _, half = _run(tmp_path / "half", steps=6, eval_every=3, reward=interrupting)
    assert half.stopped_early and half.lora_path.name == "alignprop_lora-partial.safetensors"
    resumed, _ = _run(tmp_path / "resumed", steps=6, eval_every=3, reward=reward,
                      resume_from=tmp_path / "half" / "train_state.pt")
    sa, sb = lora_state_dict(full.lora_target), lora_state_dict(resumed.lora_target)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
