"""TrainConfig.offload_reward: the reward's networks wait off the device between scoring passes, come to
it just before each pass and leave once the reward's part of backward is done; the LoRA is unchanged.

There is no second device here, so a spy network records where it is sent instead of going there: the
CPU is its home and "meta" the parking place it is told to go to.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.rewards import Reward, RewardSpec, make_mixture
from alignprop_core.rewards.base import FunctionReward
from alignprop_core.rewards import offload
from alignprop_core.rewards.offload import OffloadedReward
from alignprop_core.training.run import TrainRun
from alignprop_core.training.trainer import train
from tiny_models import make_backend

PROMPTS = ["a cat", "a dog", "a horse"]


class Recorded(torch.autograd.Function):
    """Identity that logs when backward passes through it."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("reward backward")
        return grad, None


class SpyNet(torch.nn.Module):
    """A small frozen scoring network that logs its forward passes and every place it is sent to
    (without going there, so the test runs on one device)."""

    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)

    def to(self, device, *args, **kwargs):  # noqa: D401 - a spy: records the move only
        self.log.append(f"to {torch.device(device)}")
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.log.append("forward")
        return self.conv(Recorded.apply(images, self.log)).tanh().mean(dim=(1, 2, 3))  # (B,)


class SpyReward(Reward):
    def __init__(self, log: list[str]):
        super().__init__(RewardSpec("spy"))
        self.net = SpyNet(log)

    def __call__(self, images, prompts):
        return self.net(images)

    def modules(self):
        return [self.net]


def _configs(**kw):
    sampler = SamplerConfig(steps=3, guidance_scale=3.0, k=2)
    cfg = TrainConfig(**{**dict(reward="spy", steps=2, batch_size=2, lr=1e-2, width=16, height=16,
                                eval_every=0, keep_best=False), **kw})
    return sampler, LoraConfig(rank=2, alpha=2.0), cfg


def test_networks_come_for_each_pass_and_leave_after_the_rewards_backward(monkeypatch):
    monkeypatch.setattr(offload, "PARK", torch.device("meta"))
    log: list[str] = []
    sampler, lora, cfg = _configs(offload_reward=True)
    run = TrainRun(make_backend(torch.float32), SpyReward(log), PROMPTS, PROMPTS, sampler, lora, cfg)
    assert isinstance(run.reward, OffloadedReward)
    assert log == ["to meta"]  # parked before any sampling
    hooked = run.params[0]
    hooked.register_post_accumulate_grad_hook(lambda p: log.append("lora grad"))
    log.clear()
    run.step()
    # load, score, the reward's backward, park at once, and only then the rest of backward (VAE,
    # denoiser) reaching the LoRA
    assert log[:4] == ["to cpu", "forward", "reward backward", "to meta"], log
    assert log[4:] and set(log[4:]) == {"lora grad"}, log
    log.clear()
    run.evaluate()  # one batch of held-out images, without gradient: back as soon as the scores are out
    assert log == ["to cpu", "forward", "to meta"], log
    log.clear()
    run.close()
    assert log == ["to cpu"]  # home, as the caller gave it


def test_a_failing_pass_parks_the_networks_too(monkeypatch):
    monkeypatch.setattr(offload, "PARK", torch.device("meta"))
    log: list[str] = []

    def broken(images, prompts):
        raise RuntimeError("scoring failed")

    reward = OffloadedReward(FunctionReward(RewardSpec("broken"), broken, modules=[SpyNet(log)]))
    try:
        reward(torch.rand(1, 3, 8, 8), ["a cat"])
    except RuntimeError:
        pass
    assert log == ["to cpu", "to meta"]


def test_train_restores_the_callers_networks_and_the_lora_is_bit_identical(tmp_path):
    files = {}
    for offloaded in (False, True):
        log: list[str] = []
        reward = SpyReward(log)
        sampler, lora, cfg = _configs(offload_reward=offloaded, steps=3, eval_every=2)
        result = train(make_backend(torch.float32), reward, PROMPTS, PROMPTS[:1], sampler, lora, cfg,
                       out_dir=tmp_path / str(offloaded))
        files[offloaded] = load_file(str(result.lora_path))
        moves = [e for e in log if e.startswith("to ")]
        assert (len(moves) > 0) == offloaded
        assert not offloaded or moves[-1] == "to cpu"  # restored to where it was built
    assert files[False].keys() == files[True].keys()
    for key in files[False]:
        assert torch.equal(files[False][key], files[True][key]), key


def test_judges_are_offloaded_with_the_reward(monkeypatch):
    monkeypatch.setattr(offload, "PARK", torch.device("meta"))
    log: list[str] = []
    judge = FunctionReward(RewardSpec("judge"), lambda images, prompts: images.mean(dim=(1, 2, 3)),
                           modules=[SpyNet(log)])
    sampler, lora, cfg = _configs(offload_reward=True)
    run = TrainRun(make_backend(torch.float32), SpyReward([]), PROMPTS, PROMPTS[:1], sampler, lora, cfg,
                   judges=[judge])
    assert isinstance(run.judges["judge"], OffloadedReward) and log == ["to meta"]
    log.clear()
    run.evaluate()
    assert log == ["to cpu", "to meta"]


def test_reward_modules_of_factories_and_mixtures():
    shared, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a = FunctionReward(RewardSpec("a"), lambda i, p: i.mean(dim=(1, 2, 3)), modules=[shared])
    b = FunctionReward(RewardSpec("b"), lambda i, p: i.mean(dim=(1, 2, 3)), modules=[shared, other])
    plain = lambda i, p: i.mean(dim=(1, 2, 3))  # noqa: E731 - a plain scoring function has no networks
    mixed = make_mixture([(a, 1.0), (b, 0.5), (plain, 2.0)])
    assert mixed.modules() == [shared, other]  # each network once
    from alignprop_core.rewards import make_reward

    assert make_reward("toy_count").modules()  # the toy classifier
    assert make_reward("color_target").modules() == []
