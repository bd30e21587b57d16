"""Configs reject bad values with a sentence that names the field and the fix."""
from __future__ import annotations

import pytest

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig, field_help, to_dict


@pytest.mark.parametrize("kwargs, match", [
    (dict(truncation="random"), r"truncation='random' is not known; use one of fixed, uniform, gaussian"),
    (dict(steps=10, k=11), r"k=11 is outside \[1, steps=10\]"),
    (dict(steps=10, k=0), r"k=0 is outside"),
    (dict(truncation="uniform", k_min=3, k_max=2), r"k_min=3, k_max=2"),
    (dict(truncation="gaussian", k_mean=0.5), r"k_mean=0.5 is outside"),
    (dict(steps=0), r"steps must be > 0"),
    (dict(guidance_scale=0.5), r"guidance_scale=0.5 is below 1"),
    (dict(eta=-1.0), r"eta must be >= 0"),
])
def test_sampler_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


def test_guidance_below_one_is_fine_without_cfg():
    assert SamplerConfig(guidance_scale=0.5, use_cfg=False).guidance_scale == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"LoraConfig.rank must be > 0"),
    (dict(alpha=-1), r"LoraConfig.alpha must be > 0"),
    (dict(target_modules=()), r"target_modules is empty"),
])
def test_lora_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), r"TrainConfig.steps must be > 0"),
    (dict(lr=0.0), r"TrainConfig.lr must be > 0"),
    (dict(batch_size=-2), r"batch_size must be > 0"),
    (dict(loss="minimize"), r"loss='minimize' is not known; use one of maximize, target"),
    (dict(mixed_precision="fp8"), r"use one of no, fp16, bf16"),
    (dict(adam_beta1=1.0), r"adam_beta1"),
    (dict(lr_schedule="step"), r"lr_schedule='step' is not known; use one of constant, linear, cosine"),
    (dict(lr_warmup_steps=-1), r"lr_warmup_steps must be >= 0"),
    (dict(eval_latents=0), r"TrainConfig.eval_latents must be > 0"),
])
def test_train_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_every_field_is_documented_and_serialisable():
    for cls in (SamplerConfig, LoraConfig, TrainConfig):
        helps = field_help(cls)
        assert helps and all(text for text in helps.values()), cls
        assert set(to_dict(cls())) == set(helps)
