"""A LoRA is checked against the model before anything is injected: finite values, factor shapes
that fit the target layers (alignprop_core.lora.check, lora.file.check_lora_fits / apply_lora_file)."""
from __future__ import annotations

import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import (LoraFile, add_lora, apply_lora_file, check_lora_finite, check_lora_fits,
                                 convert_names, has_lora, load_lora, lora_parameters, lora_state_dict,
                                 peft_to_kohya, remove_lora, save_lora, save_lora_file)
from alignprop_core.lora.check import expected_factor_shapes, factor_mismatch  # the check module's own helpers
from test_lora import _ldm_view, inputs, run  # noqa: F401 (fixture)
from tiny_models import make_backend, make_unet

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
TO_K2 = f"{ATTN}_attn2_to_k"  # cross attention: (32 features, 32 context) in the tiny UNet
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d(32, 32, 3)


def lora_for(unet, targets=("to_q", "to_k", "to_v", "to_out.0"), seed=5) -> LoraFile:
    """A rank-4 LoRA with non-zero factors, made for `unet` (which is left without LoRA)."""
    cfg = LoraConfig(rank=4, alpha=4.0, target_modules=targets)
    add_lora(unet, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = peft_to_kohya(lora_state_dict(unet), cfg.alpha)
    remove_lora(unet)
    return LoraFile(state=state, rank=4, alpha=4.0, target_modules=targets)


def with_tensor(lora: LoraFile, key: str, value: torch.Tensor) -> LoraFile:
    return LoraFile(state={**lora.state, key: value}, rank=lora.rank, alpha=lora.alpha,
                    target_modules=lora.target_modules)


@pytest.fixture(scope="module")
def attn_lora():
    return lora_for(make_unet())


def test_a_lora_made_for_the_model_passes_and_applies(attn_lora, inputs):
    unet = make_unet()
    before = run(unet, inputs)
    check_lora_fits(attn_lora, unet)
    assert not has_lora(unet)  # the check itself injects nothing
    apply_lora_file(unet, attn_lora)
    assert not torch.allclose(run(unet, inputs), before)


@pytest.mark.parametrize("suffix, shape, needed", [
    ("lora_down.weight", (4, 48), (4, 32)),  # another model's context width on attn2.to_k
    ("lora_up.weight", (40, 4), (32, 4)),
])
def test_wrong_linear_shape_is_refused_naming_key_and_both_shapes(attn_lora, inputs, suffix, shape, needed):
    unet = make_unet()
    before = run(unet, inputs)
    bad = with_tensor(attn_lora, f"{TO_K2}.{suffix}", torch.zeros(shape))
    for call in (check_lora_fits, lambda lora, m: apply_lora_file(m, lora)):
        with pytest.raises(ValueError) as err:
            call(bad, unet)
        message = str(err.value)
        assert f"'{TO_K2}.{suffix}'" in message and f"has shape {shape}" in message
        assert "weight shape (32, 32)" in message and f"would need {needed}" in message
        assert "made for another model" in message and "SDXL" in message
    assert not has_lora(unet)  # nothing injected
    assert torch.equal(run(unet, inputs), before)


def test_wrong_shape_on_a_model_that_already_has_lora_changes_nothing(attn_lora):
    unet = make_unet()
    add_lora(unet, LoraConfig(rank=4, alpha=4.0))
    state = lora_state_dict(unet)
    with pytest.raises(ValueError, match="has shape"):
        apply_lora_file(unet, with_tensor(attn_lora, f"{TO_K2}.lora_down.weight", torch.zeros(4, 48)))
    after = lora_state_dict(unet)
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_the_first_mismatching_key_is_named(attn_lora):
    later = f"{ATTN}_attn2_to_v.lora_up.weight"
    bad = with_tensor(with_tensor(attn_lora, later, torch.zeros(9, 4)), f"{TO_K2}.lora_up.weight",
                      torch.zeros(7, 4))
    with pytest.raises(ValueError, match=f"'{TO_K2}.lora_up.weight' has shape \\(7, 4\\)"):
        check_lora_fits(bad, make_unet())


def test_wrong_conv_shape_is_refused():
    unet = make_unet()
    lora = lora_for(unet, targets=("conv1",))
    check_lora_fits(lora, unet)
    assert lora.state[f"{CONV1}.lora_down.weight"].shape == (4, 32, 3, 3)
    # a 1x1 kernel where the model has 3x3
    bad = with_tensor(lora, f"{CONV1}.lora_down.weight", torch.zeros(4, 32, 1, 1))
    with pytest.raises(ValueError) as err:
        apply_lora_file(unet, bad)
    message = str(err.value)
    assert f"'{CONV1}.lora_down.weight' has shape (4, 32, 1, 1)" in message
    assert "weight shape (32, 32, 3, 3)" in message and "would need (4, 32, 3, 3)" in message
    assert not has_lora(unet)
    # conv factors for a different number of output channels
    bad = with_tensor(lora, f"{CONV1}.lora_up.weight", torch.zeros(64, 4, 1, 1))
    with pytest.raises(ValueError, match=r"lora_up.weight' has shape \(64, 4, 1, 1\).*would need \(32, 4, 1, 1\)"):
        check_lora_fits(bad, unet)


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_lora_is_refused_before_injection(attn_lora, value, word):
    key = f"{ATTN}_attn1_to_q.lora_up.weight"
    broken = attn_lora.state[key].clone()
    broken[0, 0] = value
    bad = with_tensor(attn_lora, key, broken)
    with pytest.raises(ValueError) as err:
        check_lora_finite(bad.state)
    message = str(err.value)
    assert f"'{key}'" in message and f"1 {word}" in message and "broken" in message
    assert "retrain it or pick another LoRA" in message
    unet = make_unet()
    with pytest.raises(ValueError, match="broken"):
        apply_lora_file(unet, bad)
    assert not has_lora(unet)


def test_save_refuses_a_non_finite_lora(attn_lora, tmp_path):
    key = f"{TO_K2}.lora_down.weight"
    bad = with_tensor(attn_lora, key, torch.full((4, 32), float("nan")))
    with pytest.raises(ValueError, match=f"'{key}' holds 128 NaN"):
        save_lora_file(tmp_path / "nan.safetensors", bad)
    assert not list(tmp_path.iterdir())


def test_save_lora_shares_the_checks_of_save_lora_file(tmp_path):
    """A model's LoRA is written by the same writer: a diverged (NaN) LoRA is refused there too."""
    unet = make_unet()
    cfg = LoraConfig(rank=4, alpha=4.0, target_modules=("to_k",))
    add_lora(unet, cfg)
    with torch.no_grad():
        lora_parameters(unet)[0][1].fill_(float("nan"))
    with pytest.raises(ValueError, match="holds .* NaN"):
        save_lora(tmp_path / "nan.safetensors", unet, cfg)
    assert not list(tmp_path.iterdir())


def test_save_refuses_a_rank_or_alpha_that_its_tensors_contradict(attn_lora, tmp_path):
    for rank, alpha in ((8, 4.0), (4, 8.0)):
        wrong = LoraFile(state=attn_lora.state, rank=rank, alpha=alpha)
        with pytest.raises(ValueError, match=f"says rank={rank}, alpha={alpha} but its tensors have "
                                             r"rank=4, alpha=4\.0"):
            save_lora_file(tmp_path / "wrong.safetensors", wrong)
    assert not list(tmp_path.iterdir())


def test_a_saved_lora_saved_again_from_its_file_is_the_same_file(tmp_path):
    """save_lora and save_lora_file write the same tensors and metadata for the same LoRA."""
    unet = make_unet()
    cfg = LoraConfig(rank=4, alpha=4.0, target_modules=("to_k", "conv1"))
    add_lora(unet, cfg)
    first = save_lora(tmp_path / "a.safetensors", unet, cfg, metadata={"alignprop.step": "3"}, arch="sd15")
    again = save_lora_file(tmp_path / "b.safetensors", load_lora(first), arch="sd15")
    a, b = load_lora(first), load_lora(again)
    assert a.metadata == b.metadata and a.metadata["alignprop.step"] == "3"
    assert a.target_modules == b.target_modules == ("to_k", "conv1")
    assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_renamed_lora_fits_and_a_wrong_shape_names_the_files_own_key(inputs):
    """A diffusers-named file on an LDM-named UNet (ComfyUI's) is renamed before the shape check."""
    unet = make_unet()
    lora = lora_for(unet, targets=("to_k", "conv1"))
    ldm = _ldm_view(unet)
    check_lora_fits(lora, ldm)
    ldm_state = convert_names(lora.state, "diffusers", "ldm", unet)
    check_lora_fits(LoraFile(state=ldm_state, rank=4, alpha=4.0), unet)  # and the other way round
    bad = with_tensor(lora, f"{TO_K2}.lora_down.weight", torch.zeros(4, 48))
    with pytest.raises(ValueError) as err:
        apply_lora_file(ldm, bad)
    message = str(err.value)
    assert f"'{TO_K2}.lora_down.weight' has shape (4, 48)" in message  # the file's name, not the LDM one
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in message  # the model's layer
    assert not has_lora(ldm)


def test_trainer_init_lora_with_nan_is_refused_before_sampling(attn_lora):
    backend = make_backend()
    key = f"{TO_K2}.lora_down.weight"
    bad = with_tensor(attn_lora, key, torch.full((4, 32), float("inf")))
    from alignprop_core.rewards import make_reward
    from alignprop_core.training.trainer import train

    cfg = TrainConfig(reward="color_target", steps=1, batch_size=1, width=16, height=16)
    with pytest.raises(ValueError, match=f"'{key}' holds 128 Inf"):
        train(backend, make_reward("color_target"), ["a"], ["b"], SamplerConfig(steps=2), LoraConfig(rank=4, alpha=4.0),
              cfg, init_lora=bad)


def test_factor_shapes_exact_and_as_comfyui_patches_them():
    assert expected_factor_shapes((320, 768), 4) == ((4, 768), (320, 4))
    assert expected_factor_shapes((320, 640, 3, 3), 8) == ((8, 640, 3, 3), (320, 8, 1, 1))
    assert factor_mismatch((4, 768), (320, 4), (320, 768)) is None
    assert factor_mismatch((4, 2048), (320, 4), (320, 768)) == "down"
    assert factor_mismatch((4, 768), (640, 4), (320, 768)) == "up"
    # linear factors on a 1x1 convolution: peft needs conv factors, ComfyUI's patching reshapes
    assert factor_mismatch((4, 320), (320, 4), (320, 320, 1, 1)) == "down"
    assert factor_mismatch((4, 320), (320, 4), (320, 320, 1, 1), exact=False) is None
    assert factor_mismatch((4, 320, 1, 1), (320, 4, 1, 1), (320, 320, 3, 3), exact=False) == "down"
    assert factor_mismatch((4, 320, 3, 3), (320, 4, 3, 3), (320, 320, 3, 3), exact=False) == "up"


def test_a_lora_on_a_layer_without_a_weight_matrix_is_refused(attn_lora):
    name = f"{ATTN}_norm1"  # a LayerNorm: its weight is a vector
    bad = LoraFile(state={**attn_lora.state, f"{name}.lora_down.weight": torch.zeros(4, 32),
                          f"{name}.lora_up.weight": torch.zeros(32, 4), f"{name}.alpha": torch.tensor(4.0)},
                   rank=4, alpha=4.0)
    unet = make_unet()
    with pytest.raises(ValueError, match=f"'{name}.lora_down.weight' targets .*LayerNorm without a weight matrix"):
        apply_lora_file(unet, bad)
    assert not has_lora(unet)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10])
def test_a_damaged_lora_file_is_named(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.safetensors' is not a readable .safetensors file"):
        load_lora(path)
