"""The sampler on rectified-flow schedules, distilled guidance, and the DRaFT-LV estimator.

The tiny UNet stands in for a velocity model here (it takes float timesteps as well as integer
ones), so the flow chain, its gradients and DRaFT-LV are checked on the same float64 model as the
DDIM path: against diffusers' FlowMatchEulerDiscreteScheduler, with and without checkpointing,
against finite differences, and against the DRaFT-LV objective written out by hand.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import add_lora, lora_parameters
from alignprop_core.models.backend import unet_denoiser
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.chain import DDIMStep, FlowStep, make_chain
from alignprop_core.sampling.flow_schedule import FlowSchedule
from alignprop_core.sampling.sampler import sample_images, sample_latents
from alignprop_core.training.run import TrainRun
from test_flow_schedule import FLUX_CONFIG, SD3_CONFIG, float64_diffusers, set_reference  # noqa: F401
from tiny_models import SD15_SCHEDULER, make_backend

PROMPTS = ["a cat", "a dog"]
SD3_FLOW = FlowSchedule.from_config(SD3_CONFIG)
FLUX_FLOW = dataclasses.replace(FlowSchedule.from_config(FLUX_CONFIG), sigma_grid="flux")
V_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
FAMILIES = ["epsilon", "v_prediction", "flow"]


def _x_T(backend, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(backend.latent_shape(batch, size, size), generator=g,
                       dtype=backend.lora_target.dtype)


def _with_lora(backend):
    add_lora(backend.lora_target, LoraConfig(rank=2, alpha=2.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in lora_parameters(backend.lora_target):
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return backend


def _backend(family: str, lora: bool = True):
    if family == "flow":
        backend = dataclasses.replace(make_backend(torch.float64), schedule=SD3_FLOW)
    elif family == "v_prediction":
        backend = make_backend(torch.float64, scheduler=V_SCHEDULER)
    else:
        backend = make_backend(torch.float64)
    return _with_lora(backend) if lora else backend


def _grads(backend, cfg, k, reward, seed=3):
    images = sample_images(backend, PROMPTS, cfg, _x_T(backend), grad_steps=k,
                           generator=torch.Generator().manual_seed(seed))
    prompts = PROMPTS * (images.shape[0] // len(PROMPTS))
    loss = -reward(images, prompts).mean()
    params = [p for _, p in lora_parameters(backend.lora_target)]
    for p in params:
        p.grad = None
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


# ---- flow chain ----

@pytest.mark.parametrize("schedule, flux_grid, size", [(SD3_FLOW, False, 16), (FLUX_FLOW, True, 16),
                                                       (FLUX_FLOW, True, 32)])
def test_flow_sampler_equals_a_diffusers_flow_match_loop(float64_diffusers, schedule, flux_grid, size):
    backend = _backend("flow", lora=False)
    backend.schedule = schedule
    cfg = SamplerConfig(steps=4, guidance_scale=3.0)
    x_T = _x_T(backend, size=size)
    cond = backend.encode_prompts(PROMPTS)
    uncond = backend.encode_prompts([""] * 2)
    ours = sample_latents(backend.denoiser, schedule, x_T, cond, uncond, cfg, grad_steps=0)

    ref = float64_diffusers(FLUX_CONFIG if flux_grid else SD3_CONFIG)
    h, w = x_T.shape[-2:]
    mu = None
    if flux_grid:
        seq = (h // 2) * (w // 2)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)  # FLUX pipeline's calculate_shift
    set_reference(ref, cfg.steps, mu=mu, flux_grid=flux_grid)
    unet = backend.lora_target
    x = x_T
    with torch.no_grad():
        for t in ref.timesteps:
            ts = t.expand(2).float()
            u = unet(x, ts, encoder_hidden_states=uncond["context"]).sample
            c = unet(x, ts, encoder_hidden_states=cond["context"]).sample
            x = ref.step(u + cfg.guidance_scale * (c - u), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


def test_chains_per_family():
    ddim = make_chain(make_backend().schedule, 4, 0.0, (1, 4, 8, 8))
    assert all(isinstance(s, DDIMStep) for s in ddim) and [s.t for s in ddim] == [751, 501, 251, 1]
    flow = make_chain(FLUX_FLOW, 4, 0.0, (1, 16, 8, 8))
    assert all(isinstance(s, FlowStep) for s in flow)
    assert flow[0].sigma == 1.0 and flow[-1].sigma_next == 0.0
    assert all(a.sigma_next == b.sigma for a, b in zip(flow, flow[1:]))
    # FLUX shifts by token count: a bigger image spends more of its steps at high noise
    bigger = make_chain(FLUX_FLOW, 4, 0.0, (1, 16, 64, 64))
    assert bigger[1].sigma > flow[1].sigma


def test_eta_on_a_flow_model_is_refused():
    backend = _backend("flow", lora=False)
    with pytest.raises(ValueError, match="rectified-flow model.*set eta to 0"):
        sample_images(backend, PROMPTS, SamplerConfig(steps=2, eta=1.0), _x_T(backend))


@pytest.mark.parametrize("k", [1, 3])
def test_flow_checkpointing_leaves_gradients_unchanged(k):
    backend = _backend("flow")
    reward = make_reward("color_target")
    base = dict(steps=3, guidance_scale=2.0)
    _, g_ckpt = _grads(backend, SamplerConfig(**base), k, reward)
    _, g_plain = _grads(backend, SamplerConfig(**base, checkpoint_unet=False, checkpoint_vae=False),
                        k, reward)
    assert any(g.abs().max() > 0 for g in g_ckpt)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _fd(loss_of, params, direction, h=1e-5):
    """Central finite difference of loss_of() along `direction` in LoRA space."""
    original = [p.detach().clone() for p in params]
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, p0, d in zip(params, original, direction):
                p.copy_(p0 + sign * h * d)
            values.append(float(loss_of()))
        for p, p0 in zip(params, original):
            p.copy_(p0)
    return (values[0] - values[1]) / (2 * h)


def _direction(grads, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(gr.shape, generator=g, dtype=gr.dtype) for gr in grads]


def test_flow_full_backprop_matches_finite_differences():
    backend = _backend("flow")
    cfg = SamplerConfig(steps=3, guidance_scale=2.0, k=3)
    reward = make_reward("color_target")
    _, grads = _grads(backend, cfg, 3, reward)
    direction = _direction(grads, 11)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    params = [p for _, p in lora_parameters(backend.lora_target)]

    def loss():
        images = sample_images(backend, PROMPTS, cfg, _x_T(backend), grad_steps=0,
                               generator=torch.Generator().manual_seed(3))
        return -reward(images, PROMPTS).mean()
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(_fd(loss, params, direction), rel=1e-5, abs=1e-9)


# ---- distilled guidance ----

def _guided_backend():
    """The flow stand-in with a guidance input: the velocity is scaled by (1 + g / 10)."""
    backend = _backend("flow", lora=False)
    base = unet_denoiser(backend.lora_target)
    seen = []

    def denoise(x, t, cond):
        seen.append(cond["guidance"].clone())
        plain = {k: v for k, v in cond.items() if k != "guidance"}
        return base(x, t, plain) * (1 + cond["guidance"].view(-1, 1, 1, 1) / 10)
    backend.denoiser = denoise
    backend.guidance_input, backend.default_guidance = True, 3.5
    return backend, seen


def test_distilled_guidance_is_a_model_input_without_a_second_pass():
    backend, seen = _guided_backend()
    x_T = _x_T(backend)
    cfg = SamplerConfig(steps=2, use_cfg=False)
    default = sample_images(backend, PROMPTS, cfg, x_T)
    assert len(seen) == 2 and all(g.shape == (2,) and (g == 3.5).all() for g in seen)
    seen.clear()
    strong = sample_images(backend, PROMPTS, dataclasses.replace(cfg, distilled_guidance=8.0), x_T)
    assert len(seen) == 2 and all((g == 8.0).all() for g in seen)
    assert not torch.allclose(default, strong)


def test_distilled_guidance_on_a_model_without_that_input_is_refused():
    backend = _backend("flow", lora=False)
    cfg = SamplerConfig(steps=2, use_cfg=False, distilled_guidance=3.5)
    with pytest.raises(ValueError, match="has no guidance input.*set it to 0"):
        sample_images(backend, PROMPTS, cfg, _x_T(backend))
    with pytest.raises(ValueError, match="has no guidance input"):
        TrainRun(backend, make_reward("color_target"), PROMPTS, PROMPTS, cfg, LoraConfig(),
                 TrainConfig(steps=1, batch_size=1, height=16, width=16))


# ---- DRaFT-LV ----

def test_draft_lv_settings_are_checked():
    with pytest.raises(ValueError, match="lv_samples=0 must be >= 1"):
        SamplerConfig(estimator="draft_lv", lv_samples=0)
    with pytest.raises(ValueError, match="last step only.*k=1"):
        SamplerConfig(estimator="draft_lv", k=2)
    with pytest.raises(ValueError, match="estimator='nope' is not known"):
        SamplerConfig(estimator="nope")


def _draft_lv_objective(backend, cfg, reward, x_T, seed, live=None):
    """DRaFT-LV written out: the chain without grad to the last step, the last step with grad,
    then n re-noised copies of the stop-gradient result, each denoised by the last step with grad;
    minus the mean reward over the n + 1 results. `live` is the denoiser of the last step."""
    live = live or backend.denoiser
    gen = torch.Generator().manual_seed(seed)
    cond = backend.encode_prompts(PROMPTS)
    uncond = backend.encode_prompts([""] * len(PROMPTS))
    chain = make_chain(backend.schedule, cfg.steps, cfg.eta, tuple(x_T.shape))

    def draw(x, step):
        return torch.randn(x.shape, generator=gen, dtype=x.dtype) if step.needs_noise else None

    def step_with(denoiser, step, x, noise):
        ts = torch.full((x.shape[0],), step.t, dtype=torch.long if isinstance(step.t, int) else torch.float32)
        u, c = denoiser(x, ts, uncond), denoiser(x, ts, cond)
        return step.update(u + cfg.guidance_scale * (c - u), x, noise)

    x = x_T
    with torch.no_grad():
        for step in chain[:-1]:
            x = step_with(backend.denoiser, step, x, draw(x, step))
    last = chain[-1]
    noise = draw(x, last)
    results = [step_with(live, last, x, noise)]
    with torch.no_grad():  # the stop-gradient result: from the unperturbed model
        clean = step_with(backend.denoiser, last, x, noise)
    for _ in range(cfg.lv_samples):
        e = torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
        x_t = last.renoise(clean, e)
        results.append(step_with(live, last, x_t, draw(x_t, last)))
    images = backend.decode(torch.cat(results))
    return -reward(images, PROMPTS * (cfg.lv_samples + 1)).mean()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_draft_lv_gradient_equals_the_objective_written_out(family, eta):
    if family == "flow" and eta:
        pytest.skip("flow models sample with the deterministic ODE")
    backend = _backend(family)
    reward = make_reward("color_target")
    cfg = SamplerConfig(steps=3, eta=eta, guidance_scale=2.0, estimator="draft_lv", lv_samples=2)
    loss, grads = _grads(backend, cfg, 1, reward, seed=5)
    params = [p for _, p in lora_parameters(backend.lora_target)]
    for p in params:
        p.grad = None
    ref_loss = _draft_lv_objective(backend, cfg, reward, _x_T(backend), seed=5)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    assert any(g.abs().max() > 0 for g in grads)
    for a, p in zip(grads, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_lv_gradient_matches_finite_differences(family):
    """The finite difference perturbs the LoRA in the last step's calls only; the chain before it
    and the re-noised clean latent stay at the unperturbed LoRA (they carry no gradient)."""
    backend = _backend(family)
    reward = make_reward("color_target")
    cfg = SamplerConfig(steps=3, guidance_scale=2.0, estimator="draft_lv", lv_samples=2)
    _, grads = _grads(backend, cfg, 1, reward, seed=5)
    direction = _direction(grads, 13)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))

    frozen = copy.deepcopy(backend.lora_target)
    frozen_backend = dataclasses.replace(backend, denoiser=unet_denoiser(frozen))
    live = unet_denoiser(backend.lora_target)
    params = [p for _, p in lora_parameters(backend.lora_target)]

    def loss():
        return _draft_lv_objective(frozen_backend, cfg, reward, _x_T(backend), seed=5, live=live)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(_fd(loss, params, direction), rel=1e-5, abs=1e-9)


def test_draft_lv_returns_n_plus_one_estimates_only_with_gradient():
    backend = _backend("epsilon")
    cfg = SamplerConfig(steps=2, guidance_scale=2.0, estimator="draft_lv", lv_samples=3)
    x_T = _x_T(backend)
    images = sample_images(backend, PROMPTS, cfg, x_T, grad_steps=1,
                           generator=torch.Generator().manual_seed(0))
    assert images.shape[0] == 4 * len(PROMPTS)
    truncated = sample_images(backend, PROMPTS, dataclasses.replace(cfg, estimator="truncated"), x_T,
                              grad_steps=1)
    torch.testing.assert_close(images[:2], truncated)  # the chain's own result comes first
    assert not torch.allclose(images[2:4], images[:2])  # the copies are fresh re-noisings
    with torch.no_grad():  # evaluation: just the chain
        assert sample_images(backend, PROMPTS, cfg, x_T, grad_steps=1).shape[0] == 2


def test_training_with_draft_lv_scores_every_estimate_and_moves_the_lora():
    backend = _backend("flow", lora=False)
    calls = []

    def reward(images, prompts):
        calls.append((images.shape[0], list(prompts)))
        return images[:, 0].mean(dim=(1, 2))
    cfg = SamplerConfig(steps=2, use_cfg=False, estimator="draft_lv", lv_samples=2)
    run = TrainRun(backend, reward, PROMPTS, PROMPTS, cfg, LoraConfig(rank=2),
                   TrainConfig(steps=1, batch_size=2, height=16, width=16, lr=1e-2))
    before = [p.detach().clone() for p in run.params]
    metrics = run.step()
    assert calls[0][0] == 6 and calls[0][1][:2] == calls[0][1][2:4] == calls[0][1][4:]
    assert np.isfinite(metrics["reward"]) and np.isfinite(metrics["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, run.params))
