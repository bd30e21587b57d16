"""The differentiable sampler: equals a diffusers DDIM loop, and its gradients are right.

Gradients w.r.t. LoRA parameters are checked three ways: with and without checkpointing (identical),
against central finite differences on a float64 tiny model, and for K=1 against a finite difference
in which the LoRA is perturbed in the last denoising step only.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math

import pytest
import torch
from diffusers import DDIMScheduler

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import unet_denoiser
from alignprop_core.lora import add_lora, lora_parameters
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.sampler import draw_truncation, guided_prediction, sample_images, sample_latents
from alignprop_core.training.trainer import train
from tiny_models import CONTEXT_DIM, SD15_SCHEDULER, make_backend

PROMPTS = ["a cat", "a dog"]


def _x_T(backend, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = backend.lora_target.dtype
    return torch.randn(backend.latent_shape(batch, size, size), generator=g, dtype=dtype)


def _randomise_lora(module, seed=0, scale=0.05):
    """LoRA starts with B = 0; give both factors values so every factor gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_parameters(module):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_equals_a_diffusers_ddim_loop(backend64, eta):
    cfg = SamplerConfig(steps=5, eta=eta, guidance_scale=3.0)
    x_T = _x_T(backend64)
    cond = backend64.encode_prompts(PROMPTS)["context"]
    uncond = backend64.encode_prompts([""] * 2)["context"]
    ours = sample_latents(backend64.denoiser, backend64.schedule, x_T, {"context": cond},
                          {"context": uncond}, cfg, grad_steps=0, generator=torch.Generator().manual_seed(7))

    ref = DDIMScheduler.from_config(SD15_SCHEDULER)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = torch.as_tensor(ref.final_alpha_cumprod).double()
    ref.set_timesteps(cfg.steps)
    g = torch.Generator().manual_seed(7)
    x = x_T
    unet = backend64.lora_target
    with torch.no_grad():
        for t in ref.timesteps:
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
            u = unet(x, t, encoder_hidden_states=uncond).sample
            c = unet(x, t, encoder_hidden_states=cond).sample
            out = u + cfg.guidance_scale * (c - u)
            x = ref.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-8, atol=1e-8)


def _lora_grads(backend, cfg, k, reward):
    images = sample_images(backend, PROMPTS, cfg, _x_T(backend), grad_steps=k,
                           generator=torch.Generator().manual_seed(3))
    loss = -reward(images, PROMPTS).sum()
    params = [p for _, p in lora_parameters(backend.lora_target)]
    for p in params:
        p.grad = None
    loss.backward()  # the reentrant checkpoint supports backward(), not autograd.grad
    grads = tuple(p.grad.clone() for p in params)
    return loss.detach(), grads


@pytest.fixture
def lora_backend():
    backend = make_backend(torch.float64)
    add_lora(backend.lora_target, LoraConfig(rank=2, alpha=2.0))
    _randomise_lora(backend.lora_target)
    return backend


@pytest.mark.parametrize("k", [1, 3])
def test_checkpointing_leaves_gradients_unchanged(lora_backend, k):
    reward = make_reward("color_target")
    base = dict(steps=3, eta=1.0, guidance_scale=2.0)
    _, g_ckpt = _lora_grads(lora_backend, SamplerConfig(**base, checkpoint_unet=True, checkpoint_vae=True),
                            k, reward)
    _, g_plain = _lora_grads(lora_backend, SamplerConfig(**base, checkpoint_unet=False, checkpoint_vae=False),
                             k, reward)
    assert any(g.abs().max() > 0 for g in g_ckpt)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _directional_fd(backend, cfg, reward, direction, h=1e-5, k=None, last_step_only=False):
    """Central finite difference of the reward loss along `direction` in LoRA space."""
    params = [p for _, p in lora_parameters(backend.lora_target)]
    original = [p.detach().clone() for p in params]

    def loss_at(sign):
        with torch.no_grad():
            for p, p0, d in zip(params, original, direction):
                p.copy_(p0 + sign * h * d)
        if not last_step_only:
            images = sample_images(backend, PROMPTS, cfg, _x_T(backend), grad_steps=0,
                                   generator=torch.Generator().manual_seed(3))
            return -reward(images, PROMPTS).sum()
        # the first T-1 steps see the unperturbed LoRA, only the last step the perturbed one
        frozen = copy.deepcopy(backend.lora_target)
        with torch.no_grad():
            for (_, p), p0 in zip(lora_parameters(frozen), original):
                p.copy_(p0)
        calls = {"n": 0}
        live, old = unet_denoiser(backend.lora_target), unet_denoiser(frozen)

        def routed(x, t, cond):
            calls["n"] += 1
            return live(x, t, cond) if calls["n"] == cfg.steps else old(x, t, cond)

        routed_backend = copy.copy(backend)
        routed_backend.denoiser = routed
        images = sample_images(routed_backend, PROMPTS, cfg, _x_T(backend), grad_steps=0,
                               generator=torch.Generator().manual_seed(3))
        return -reward(images, PROMPTS).sum()

    with torch.no_grad():
        plus, minus = loss_at(+1), loss_at(-1)
        for p, p0 in zip(params, original):
            p.copy_(p0)
    return float((plus - minus) / (2 * h))


def test_full_backprop_gradient_matches_finite_differences(lora_backend):
    cfg = SamplerConfig(steps=3, eta=1.0, guidance_scale=2.0)
    reward = make_reward("color_target")
    _, grads = _lora_grads(lora_backend, cfg, k=cfg.steps, reward=reward)
    g = torch.Generator().manual_seed(11)
    direction = [torch.randn(gr.shape, generator=g, dtype=gr.dtype) for gr in grads]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    numeric = _directional_fd(lora_backend, cfg, reward, direction)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_k1_gradient_is_the_last_step_only(lora_backend):
    cfg = SamplerConfig(steps=3, eta=0.0, guidance_scale=2.0, k=1)
    reward = make_reward("color_target")
    _, g_k1 = _lora_grads(lora_backend, cfg, k=1, reward=reward)
    _, g_full = _lora_grads(lora_backend, cfg, k=3, reward=reward)
    g = torch.Generator().manual_seed(12)
    direction = [torch.randn(gr.shape, generator=g, dtype=gr.dtype) for gr in g_k1]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(g_k1, direction))
    numeric_last = _directional_fd(lora_backend, cfg, reward, direction, last_step_only=True)
    assert analytic == pytest.approx(numeric_last, rel=1e-5, abs=1e-9)
    # and the earlier steps would have contributed: the full gradient is different
    assert not all(torch.allclose(a, b) for a, b in zip(g_k1, g_full))


def test_gradients_reach_only_lora_parameters(lora_backend):
    cfg = SamplerConfig(steps=3, guidance_scale=2.0, k=2)
    reward = make_reward("color_target")
    images = sample_images(lora_backend, PROMPTS, cfg, _x_T(lora_backend), grad_steps=2)
    (-reward(images, PROMPTS).sum()).backward()
    lora_names = {n for n, _ in lora_parameters(lora_backend.lora_target)}
    for name, p in lora_backend.lora_target.named_parameters():
        if name in lora_names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_no_grad_window_gives_a_detached_result(backend32):
    cfg = SamplerConfig(steps=2, guidance_scale=2.0)
    images = sample_images(backend32, PROMPTS, cfg, _x_T(backend32), grad_steps=0)
    assert not images.requires_grad


def test_draw_truncation_strategies():
    g = torch.Generator().manual_seed(0)
    assert {draw_truncation(SamplerConfig(steps=10, k=4), g) for _ in range(20)} == {4}
    uni = {draw_truncation(SamplerConfig(steps=10, truncation="uniform", k_min=2, k_max=5), g)
           for _ in range(200)}
    assert uni == {2, 3, 4, 5}
    gauss = [draw_truncation(SamplerConfig(steps=10, truncation="gaussian", k_mean=3, k_std=4), g)
             for _ in range(500)]
    assert min(gauss) == 1 and max(gauss) == 10 and 2 < sum(gauss) / len(gauss) < 6


def test_prompt_count_must_match_latents(backend32):
    with pytest.raises(ValueError, match="one prompt per latent"):
        sample_images(backend32, ["a"], SamplerConfig(steps=1), _x_T(backend32, batch=2))


def test_grad_steps_outside_range_is_an_error(backend32):
    with pytest.raises(ValueError, match="grad_steps=5"):
        sample_latents(backend32.denoiser, backend32.schedule, _x_T(backend32), {}, {},
                       SamplerConfig(steps=2), grad_steps=5)


def _graph_nodes(t: torch.Tensor) -> int:
    """Autograd nodes reachable from t (what the graph holds until backward)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
    return len(seen)


def test_checkpointed_window_adds_a_constant_small_graph_per_step(lora_backend):
    """Checkpointing must not keep each step's UNet graph alive: memory would still grow with K."""
    def nodes(k, checkpointed):
        cfg = SamplerConfig(steps=6, guidance_scale=2.0, checkpoint_unet=checkpointed, checkpoint_vae=False)
        with torch.no_grad():
            cond = lora_backend.encode_prompts(PROMPTS)
            uncond = lora_backend.encode_prompts([""] * len(PROMPTS))
        latents = sample_latents(lora_backend.denoiser, lora_backend.schedule, _x_T(lora_backend),
                                 cond, uncond, cfg, grad_steps=k)
        return _graph_nodes(latents)

    per_step = (nodes(5, True) - nodes(1, True)) / 4
    plain_per_step = (nodes(5, False) - nodes(1, False)) / 4
    assert plain_per_step > 50  # the UNet step itself is hundreds of ops
    assert per_step <= 2, per_step  # the checkpoint node (+ at most one glue op)


# Long prompts: a text encoder gives them more context tokens (CLIP: 77 per 75-token chunk).

def _varlen_encoder(dtype, repeat_to=None):
    """A fake text encoder with 4 context tokens per word (an empty prompt: 4); with `repeat_to`,
    each context is repeated up to that many tokens (what batching long prompts must equal)."""

    def one(prompt):
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        tokens = 4 * max(1, len(prompt.split()))
        ctx = torch.randn(1, tokens, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64).to(dtype)
        return ctx if repeat_to is None else ctx.repeat(1, repeat_to // tokens, 1)

    def encode(prompts):
        contexts = [one(p) for p in prompts]
        if repeat_to is None and len({c.shape[1] for c in contexts}) > 1:
            from alignprop_core.sampling.conditioning import concat_token_sequences
            return {"context": concat_token_sequences(contexts)}
        return {"context": torch.cat(contexts)}

    return encode


def _counting(denoiser):
    calls = []

    def counted(x, t, cond):
        calls.append(cond["context"].shape)
        return denoiser(x, t, cond)

    return counted, calls


@pytest.mark.usefixtures("one_thread")
def test_repeating_context_tokens_leaves_the_unet_output_unchanged(backend64):
    """Why long prompts can be batched: cross-attention over n copies of the tokens is the same."""
    x, t = _x_T(backend64), torch.tensor([500, 300])
    ctx = torch.randn(2, 4, CONTEXT_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    once = backend64.denoiser(x, t, {"context": ctx})
    twice = backend64.denoiser(x, t, {"context": ctx.repeat(1, 2, 1)})
    torch.testing.assert_close(once, twice, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cond_len, uncond_len, calls_expected", [(8, 4, 1), (20, 4, 2), (4, 12, 1)])
def test_guidance_with_contexts_of_different_lengths(backend64, cond_len, uncond_len, calls_expected):
    """Batched (lcm up to 4x the shorter, as ComfyUI) or as two calls: equal to both repeated to the lcm."""
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(2, cond_len, CONTEXT_DIM, generator=g, dtype=torch.float64)}
    uncond = {"context": torch.randn(2, uncond_len, CONTEXT_DIM, generator=g, dtype=torch.float64)}
    lcm = math.lcm(cond_len, uncond_len)
    denoiser, calls = _counting(backend64.denoiser)
    out = guided_prediction(denoiser, _x_T(backend64), 400, cond, uncond, 3.0)
    assert len(calls) == calls_expected
    same_length = {k: {"context": c["context"].repeat(1, lcm // c["context"].shape[1], 1)}
                   for k, c in (("cond", cond), ("uncond", uncond))}
    ref = guided_prediction(backend64.denoiser, _x_T(backend64), 400, same_length["cond"],
                            same_length["uncond"], 3.0)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("one_thread")
def test_sampling_prompts_of_different_token_lengths(backend64):
    """Two prompts of 8 and 20 tokens and a 4-token negative prompt: the images equal those of an
    encoder that repeats every context to 40 tokens itself."""
    prompts, cfg = ["a cat", "a cat on a mat"], SamplerConfig(steps=2, guidance_scale=3.0, eta=1.0)
    images = {}
    for repeat_to in (None, 40):
        backend = dataclasses.replace(backend64, encode_prompts=_varlen_encoder(torch.float64, repeat_to))
        images[repeat_to] = sample_images(backend, prompts, cfg, _x_T(backend), negative_prompt="",
                                          generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(images[None], images[40], rtol=1e-8, atol=1e-8)


@pytest.mark.usefixtures("one_thread")
def test_training_with_a_long_negative_prompt_and_prompts_of_different_lengths(backend32):
    backend = dataclasses.replace(backend32, encode_prompts=_varlen_encoder(torch.float32))
    sampler = SamplerConfig(steps=2, guidance_scale=3.0, k=1)
    cfg = TrainConfig(steps=1, batch_size=2, width=16, height=16, eval_every=0, eval_batch_size=2,
                      negative_prompt="blurry low quality ugly")
    result = train(backend, make_reward("color_target"), ["a cat", "a cat on a mat"],
                   ["a fox in a field", "owl"], sampler, LoraConfig(rank=2, alpha=2.0), cfg)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert [e["step"] for e in result.evals] == [0, 1]
