"""The two penalties against reward hacking: the pull toward the base model and the LoRA's L2.

`adapters_off` must give exactly the base model and always restore the adapters. The pull's gradient
is checked against central finite differences on a float64 tiny model (full window, so truncation
does not enter) and, with a window shorter than the chain, checkpointed against plain autograd. The
L2 penalty is checked against the explicit sum of ||s B A||^2 (conv layers included). Short training
runs show that either weight keeps the LoRA's weight change smaller, and that with both weights at 0
the step computes no base pass and its loss is the reward loss.
"""
from __future__ import annotations

import functools

import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import adapters_off, add_lora, lora_delta_l2, lora_parameters
from alignprop_core.lora.inject import ADAPTER, _lora_layers
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.chain import make_chain
from alignprop_core.sampling.sampler import BasePull, sample_latents
from alignprop_core.training import step as step_module
from alignprop_core.training.run import TrainRun
from tiny_models import make_backend

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat", "a dog"]
TRAIN_PROMPTS = ["a cat", "a dog", "a horse", "a cow"]


def _randomise(module, seed=0, scale=0.05):
    """Fresh LoRA has B = 0; give both factors values so every factor has a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_parameters(module):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _lora_backend(randomise=True, targets=("to_q", "to_k", "to_v", "to_out.0")):
    backend = make_backend(torch.float64)
    add_lora(backend.lora_target, LoraConfig(rank=2, alpha=2.0, target_modules=targets))
    if randomise:
        _randomise(backend.lora_target)
    return backend


def _params(backend):
    return [p for _, p in lora_parameters(backend.lora_target)]


def _inputs(backend, batch=2):
    x_T = torch.randn(backend.latent_shape(batch, 16, 16), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    cond = backend.encode_prompts(PROMPTS[:batch])
    uncond = backend.encode_prompts([""] * batch)
    return x_T, cond, uncond


def _pulled(backend, cfg, k):
    """(x_0, the pull collector) of one sample batch with the last k steps in the window."""
    pull = BasePull(functools.partial(adapters_off, backend.lora_target))
    x_T, cond, uncond = _inputs(backend)
    x0 = sample_latents(backend.denoiser, backend.schedule, x_T, cond, uncond, cfg, k,
                        generator=torch.Generator().manual_seed(3), pull=pull)
    return x0, pull


def _grads_by_backward(backend, loss):
    for p in _params(backend):
        p.grad = None
    loss.backward()  # the reentrant checkpoint passes backward(), not autograd.grad
    return [p.grad.clone() for p in _params(backend)]


# adapters_off

def test_adapters_off_gives_exactly_the_base_output_and_restores_scaling():
    backend = make_backend(torch.float64)
    x_T, cond, _ = _inputs(backend)
    t = torch.full((2,), 500, dtype=torch.long)
    base = backend.denoiser(x_T, t, cond)
    add_lora(backend.lora_target, LoraConfig(rank=2, alpha=4.0))
    _randomise(backend.lora_target)
    layers = [layer for _, layer in _lora_layers(backend.lora_target)]
    before = [layer.scaling[ADAPTER] for layer in layers]
    adapted = backend.denoiser(x_T, t, cond)
    assert (adapted - base).abs().max() > 1e-6
    with adapters_off(backend.lora_target):
        assert torch.equal(backend.denoiser(x_T, t, cond), base)
        with adapters_off(backend.lora_target):  # as in a checkpoint's recomputation
            assert torch.equal(backend.denoiser(x_T, t, cond), base)
        assert all(layer.scaling[ADAPTER] == 0 for layer in layers)
    assert [layer.scaling[ADAPTER] for layer in layers] == before == [2.0] * len(layers)
    assert torch.equal(backend.denoiser(x_T, t, cond), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_off(backend.lora_target):
            raise RuntimeError("inside")
    assert [layer.scaling[ADAPTER] for layer in layers] == before
    assert all(p.requires_grad for p in _params(backend))  # peft's disable_adapters would clear it


def test_adapters_off_refuses_a_module_without_lora():
    with pytest.raises(ValueError, match="no LoRA layers"):
        with adapters_off(make_backend(torch.float64).lora_target):
            pass


# the pull toward the base model

def test_pull_leaves_the_sample_unchanged_and_covers_the_window():
    backend = _lora_backend()
    cfg = SamplerConfig(steps=3, eta=1.0, guidance_scale=2.0)
    x_T, cond, uncond = _inputs(backend)
    plain = sample_latents(backend.denoiser, backend.schedule, x_T, cond, uncond, cfg, 2,
                           generator=torch.Generator().manual_seed(3))
    x0, pull = _pulled(backend, cfg, k=2)
    assert torch.equal(x0, plain)
    assert len(pull.terms) == 2 and all(t.shape == (2,) and t.dtype == torch.float32 for t in pull.terms)
    assert pull.value() > 0
    lv = SamplerConfig(steps=3, guidance_scale=2.0, estimator="draft_lv", k=1, lv_samples=2)
    _, lv_pull = _pulled(backend, lv, k=1)
    assert len(lv_pull.terms) == 3  # the window's one step and its two re-noised copies
    with torch.no_grad():
        _, none = _pulled(backend, cfg, k=2)
    assert none.terms == [] and none.value() == 0  # no gradient, no window, no base pass


def test_pull_term_is_the_mean_squared_difference_of_the_guided_predictions():
    backend = _lora_backend()
    cfg = SamplerConfig(steps=1, guidance_scale=2.0)
    x_T, cond, uncond = _inputs(backend)
    _, pull = _pulled(backend, cfg, k=1)
    step = make_chain(backend.schedule, 1, 0.0, tuple(x_T.shape))[0]
    t = torch.full((2,), step.t, dtype=torch.long)

    def guided():
        u, c = backend.denoiser(x_T, t, uncond), backend.denoiser(x_T, t, cond)
        return u + cfg.guidance_scale * (c - u)

    with torch.no_grad():
        lora = guided()
        with adapters_off(backend.lora_target):
            base = guided()
    want = (lora - base).square().mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(pull.terms[0].detach(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_pull_gradient_matches_finite_differences(checkpoint):
    backend = _lora_backend()
    cfg = SamplerConfig(steps=3, eta=1.0, guidance_scale=2.0, checkpoint_unet=checkpoint)
    params = _params(backend)
    grads = _grads_by_backward(backend, _pulled(backend, cfg, k=3)[1].value().double())
    g = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    original = [p.detach().clone() for p in params]
    h, values = 1e-4, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, d in zip(params, original, direction):
                p.copy_(p0 + sign * h * d)
        values.append(_pulled(backend, cfg, k=3)[1].value().item())
    numeric = (values[0] - values[1]) / (2 * h)
    assert abs(analytic) > 1e-6
    # the pull is accumulated in float32 by design, which bounds the agreement
    assert analytic == pytest.approx(numeric, rel=2e-3)


def test_checkpointed_pull_gradient_equals_plain_autograd():
    """A window shorter than the chain, the pull beside a loss on x_0: gradients through both outputs
    of each checkpointed step, and through x_t into the earlier window step."""
    backend = _lora_backend()
    base = dict(steps=3, eta=1.0, guidance_scale=2.0)

    def loss_of(checkpoint):
        x0, pull = _pulled(backend, SamplerConfig(**base, checkpoint_unet=checkpoint), k=2)
        return x0.square().mean() + 10.0 * pull.value().double()

    ckpt = _grads_by_backward(backend, loss_of(True))
    plain = torch.autograd.grad(loss_of(False), _params(backend))
    pull_only = torch.autograd.grad(_pulled(backend, SamplerConfig(**base, checkpoint_unet=False), 2)[1]
                                    .value(), _params(backend))
    assert any(g.abs().max() > 0 for g in pull_only)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_pull_and_its_gradient_are_zero_for_a_fresh_lora():
    backend = _lora_backend(randomise=False)
    cfg = SamplerConfig(steps=3, guidance_scale=2.0)
    _, pull = _pulled(backend, cfg, k=2)
    assert pull.value() == 0
    assert all(torch.count_nonzero(g) == 0 for g in _grads_by_backward(backend, pull.value()))
    with torch.no_grad():
        for name, p in lora_parameters(backend.lora_target):
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    _, pull = _pulled(backend, cfg, k=2)
    assert pull.value() > 0
    assert any(torch.count_nonzero(g) > 0 for g in _grads_by_backward(backend, pull.value()))


# the L2 penalty on the weight change

def _explicit_l2(module):
    """Sum of ||s B A||_F^2 with every delta weight formed."""
    total = 0
    for _, layer in _lora_layers(module):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        delta = layer.scaling[ADAPTER] * (b.flatten(1) @ a.flatten(1))
        total = total + delta.square().sum()
    return total


def test_lora_l2_equals_the_explicit_sum_and_so_does_its_gradient():
    backend = _lora_backend(targets=("to_q", "to_out.0", "conv1"))
    module = backend.lora_target
    kinds = {type(layer.get_base_layer()).__name__ for _, layer in _lora_layers(module)}
    assert {"Linear", "Conv2d"} <= kinds
    params = _params(backend)
    fast = lora_delta_l2(module)
    slow = _explicit_l2(module)
    assert fast.dtype == torch.float64 and fast.dim() == 0
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0)
    g_fast = torch.autograd.grad(fast, params)
    g_slow = torch.autograd.grad(slow, params)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # and against a central difference along a random direction
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    original = [p.detach().clone() for p in params]
    h, values = 1e-6, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, p0, d in zip(params, original, direction):
                p.copy_(p0 + sign * h * d)
            values.append(lora_delta_l2(module).item())
    analytic = sum(float((gr * d).sum()) for gr, d in zip(g_fast, direction))
    assert analytic == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6)


def test_lora_l2_of_a_fresh_lora_is_zero_and_follows_the_scale():
    backend = _lora_backend(randomise=False)
    assert lora_delta_l2(backend.lora_target).item() == 0
    _randomise(backend.lora_target)
    full = lora_delta_l2(backend.lora_target).item()
    with adapters_off(backend.lora_target):
        assert lora_delta_l2(backend.lora_target).item() == 0
    assert lora_delta_l2(backend.lora_target).item() == pytest.approx(full, rel=1e-12)


# training

def _train(steps=6, **train_kw):
    backend = make_backend(torch.float32)
    sampler = SamplerConfig(steps=4, guidance_scale=3.0, k=2)
    cfg = TrainConfig(reward="color_target", steps=steps, batch_size=2, lr=1e-2, width=16, height=16,
                      seed=0, **train_kw)
    run = TrainRun(backend, make_reward("color_target"), TRAIN_PROMPTS, TRAIN_PROMPTS, sampler,
                   LoraConfig(rank=4, alpha=4.0), cfg)
    history = [run.step() for _ in range(steps)]
    return backend, history


def _delta_norm(module):
    """Sum over layers of ||s B A||_F."""
    with torch.no_grad():
        return sum(float(layer.scaling[ADAPTER] * (layer.lora_B[ADAPTER].weight.flatten(1)
                                                    @ layer.lora_A[ADAPTER].weight.flatten(1)).norm())
                   for _, layer in _lora_layers(module))


@pytest.fixture(scope="module")
def default_run(one_thread):
    return _train()


def test_default_run_computes_no_base_pass_and_its_loss_is_the_reward_loss(default_run, monkeypatch):
    backend, history = default_run
    for h in history:
        assert h["pull"] == 0.0
        assert h["loss"] == pytest.approx(-h["reward"], rel=1e-6)  # maximize, one estimate per image
    assert history[0]["lora_l2"] == 0.0 and history[-1]["lora_l2"] > 0  # measured at each step's start

    def no_base_pass(*_args, **_kwargs):
        raise AssertionError("a base pass ran with kl_weight = 0")

    monkeypatch.setattr(step_module, "adapters_off", no_base_pass)
    _, again = _train(steps=2)
    assert [h["loss"] for h in again] == [h["loss"] for h in history[:2]]


@pytest.mark.parametrize("penalty", [{"kl_weight": 1.0}, {"lora_l2_weight": 1.0}])
def test_either_penalty_keeps_the_weight_change_smaller(default_run, penalty, one_thread):
    backend, history = default_run
    penalised, pen_history = _train(**penalty)
    assert _delta_norm(penalised.lora_target) < 0.8 * _delta_norm(backend.lora_target)
    name = "pull" if "kl_weight" in penalty else "lora_l2"
    weight = next(iter(penalty.values()))
    last = pen_history[-1]
    assert last[name] > 0
    if name == "pull":
        assert last["loss"] == pytest.approx(-last["reward"] + weight * last["pull"], rel=1e-5)
    else:
        assert last["loss"] == pytest.approx(-last["reward"] + weight * last["lora_l2"], rel=1e-5)
