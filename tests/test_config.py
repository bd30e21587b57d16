"""Configs reject bad values with a sentence that names the field and the fix."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig, check_finite, to_dict


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
        helps = {f.name: f.metadata.get("help", "") for f in fields(cls)}  # what flags and tooltips show
        assert helps and all(text for text in helps.values()), cls
        assert set(to_dict(cls())) == set(helps)


def _numeric_fields():
    for cls in (SamplerConfig, LoraConfig, TrainConfig):
        for f in fields(cls):
            if f.type in ("int", "float"):
                yield cls, f.name


NUMERIC_FIELDS = list(_numeric_fields())


def test_every_numeric_field_is_covered():
    names = {f"{cls.__name__}.{name}" for cls, name in NUMERIC_FIELDS}
    assert {"TrainConfig.max_grad_norm", "TrainConfig.reward_target", "SamplerConfig.eta",
            "TrainConfig.weight_decay", "TrainConfig.adam_eps", "LoraConfig.rank"} <= names
    # a numeric field whose annotation is not plain int/float would escape the check
    by_default = {f"{cls.__name__}.{f.name}" for cls in (SamplerConfig, LoraConfig, TrainConfig)
                  for f in fields(cls) if type(getattr(cls(), f.name)) in (int, float)}
    assert names == by_default


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls, name", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in NUMERIC_FIELDS])
def test_non_finite_numbers_are_refused_by_field_name(cls, name, value):
    with pytest.raises(ValueError) as err:
        cls(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}.{name} must be ")
    assert f"got {value!r}" in message
    # the finiteness check runs before the range checks, whose messages would not say why
    assert "finite number" in message or "must be an integer" in message


def test_nan_message_in_full():
    with pytest.raises(ValueError) as err:
        TrainConfig(max_grad_norm=math.nan)
    assert str(err.value) == "TrainConfig.max_grad_norm must be a finite number, got nan; give a finite number."


@pytest.mark.parametrize("cls, name", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in NUMERIC_FIELDS])
def test_text_where_a_number_belongs_is_refused_by_field_name(cls, name):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be a number, got '1' \(str\)"):
        cls(**{name: "1"})


@pytest.mark.parametrize("cls, kwargs, match", [
    (TrainConfig, dict(steps=2.5), r"TrainConfig.steps must be an integer, got 2.5 \(float\)"),
    (SamplerConfig, dict(use_cfg="false"), r"SamplerConfig.use_cfg must be true or false, got 'false'"),
    (TrainConfig, dict(loss=1), r"TrainConfig.loss must be text, got 1 \(int\)"),
    (LoraConfig, dict(target_modules="to_q"), r"LoraConfig.target_modules must be a sequence of module names"),
    (TrainConfig, dict(lr=None), r"TrainConfig.lr must be a number, got None \(NoneType\)"),
])
def test_wrong_kinds_are_refused_by_field_name(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_finite_numbers_of_any_real_kind_pass():
    assert TrainConfig(lr=1, reward_target=-3, max_grad_norm=0).lr == 1
    assert LoraConfig(alpha=8, rank=2**70).rank == 2**70  # ints are never converted to float


def test_check_finite_names_the_input():
    assert check_finite(0.5, "strength") == 0.5
    with pytest.raises(ValueError, match=r"^strength must be a finite number, got inf"):
        check_finite(math.inf, "strength")
    with pytest.raises(ValueError, match=r"^strength must be a number, got '0.5' \(str\)"):
        check_finite("0.5", "strength")
