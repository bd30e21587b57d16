"""LoRA injection (alignprop_core.lora.inject) and LoRA files (alignprop_core.lora.file) on a tiny real UNet."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignprop_core.lora import file as lora_io  # noqa: E402  (its writer is patched to fail)
from alignprop_core.config import LoraConfig  # noqa: E402
from alignprop_core.lora import (LoraFile, add_lora, apply_lora_file, kohya_to_peft,  # noqa: E402
                                 ldm_to_diffusers_paths, load_lora, lora_parameters, lora_state_dict, mix_loras,
                                 peft_to_kohya, remove_lora, save_lora, save_lora_file, set_lora_scale,
                                 set_lora_state_dict, unet_layout)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
OUT0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"


def make_unet(dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8)
    return unet.to(dtype).eval()


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 32, generator=g)


def run(model, inputs):
    x, t, c = inputs
    return model(x.to(model.dtype), t, c.to(model.dtype)).sample


def perturb(params, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def lora_file_of(model, cfg):
    return LoraFile(state=peft_to_kohya(lora_state_dict(model), cfg.alpha), rank=cfg.rank, alpha=cfg.alpha,
                    target_modules=cfg.target_modules)


def delta_w(lora: LoraFile, name: str) -> torch.Tensor:
    up, down = lora.state[f"{name}.lora_up.weight"], lora.state[f"{name}.lora_down.weight"]
    alpha = float(lora.state[f"{name}.alpha"])
    # conv factors (r, in, kh, kw) / (out, r, 1, 1) flatten to the linear case: dW of shape (out, in*kh*kw)
    return (alpha / down.shape[0]) * up.flatten(1).double() @ down.flatten(1).double()


# ---- add_lora ---------------------------------------------------------------------------------

def test_add_lora_wraps_exactly_the_attention_projections(unet):
    from peft.tuners.lora import LoraLayer

    n_linear = sum(isinstance(m, torch.nn.Linear) and n.endswith(TARGETS) for n, m in unet.named_modules())
    params = add_lora(unet, LoraConfig(rank=4, alpha=4.0))
    n_wrapped = sum(isinstance(m, LoraLayer) for m in unet.modules())
    assert n_linear == n_wrapped == 32
    assert len(params) == 2 * n_wrapped
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    names = [n for n, _ in lora_parameters(unet)]
    assert names == sorted(names) and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)


def test_init_is_noop_deterministic_and_keeps_global_rng(unet, inputs):
    base = run(unet, inputs)
    rng = torch.get_rng_state()
    add_lora(unet, LoraConfig(init_seed=5))
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(run(unet, inputs), base)

    same, other = make_unet(), make_unet()
    add_lora(same, LoraConfig(init_seed=5))
    add_lora(other, LoraConfig(init_seed=6))
    s0, s1, s2 = lora_state_dict(unet), lora_state_dict(same), lora_state_dict(other)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    a_key = f"{OUT0}.lora_A.weight"
    assert not torch.equal(s0[a_key], s2[a_key])
    assert all(not v.any() for k, v in s0.items() if k.endswith("lora_B.weight"))


def _ldm_view(unet: torch.nn.Module) -> torch.nn.Module:
    """The transformer and res-block layers of a diffusers UNet re-registered under LDM (ComfyUI)
    paths, in LDM order."""
    view = torch.nn.Module()

    def put(path: str, module: torch.nn.Module) -> None:
        parent = view
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)

    levels = unet_layout(unet).down  # LDM input_blocks: conv_in, then resnet(+attn) blocks and downsamplers
    j = 1
    for level, depths in enumerate(levels):
        for _ in depths:
            put(f"input_blocks.{j}.0", torch.nn.Identity())
            j += 1
        if level < len(levels) - 1:
            put(f"input_blocks.{j}.0.op", torch.nn.Identity())
            j += 1
    have = dict(unet.named_modules())
    for ldm, diffusers in ldm_to_diffusers_paths("sd15", unet).items():
        if diffusers in have:  # a res block without a conv_shortcut has none to alias
            put(ldm, have[diffusers])
    return view


def test_init_does_not_depend_on_naming_or_registration_order():
    cfg = LoraConfig(init_seed=11)
    diffusers_unet, ldm_unet = make_unet(), make_unet()
    pairs = ldm_to_diffusers_paths("sd15", ldm_unet)
    view = _ldm_view(ldm_unet)
    assert [n for n in pairs][:1] != [n for n in pairs.values()][:1]  # the view really is LDM-named
    add_lora(diffusers_unet, cfg)
    add_lora(view, cfg)
    d_state, l_state = lora_state_dict(diffusers_unet), lora_state_dict(view)
    a_keys = [k for k in l_state if k.endswith("lora_A.weight")]
    assert len(a_keys) == 32
    for key in a_keys:
        module = key[: -len(".lora_A.weight")]
        assert torch.equal(l_state[key], d_state[f"{pairs[module]}.lora_A.weight"]), module
    # different modules get different draws, not one shared tensor
    firsts = {d_state[k][0, 0].item() for k in d_state if k.endswith("lora_A.weight")}
    assert len(firsts) == 32


def test_lora_dtype_follows_base_float64_else_float32():
    assert all(p.dtype == torch.float64 for p in add_lora(make_unet(torch.float64), LoraConfig()))
    half = make_unet(torch.float16)
    assert all(p.dtype == torch.float32 for p in add_lora(half, LoraConfig()))
    assert all(p.dtype == torch.float16 for n, p in half.named_parameters() if "lora_" not in n)


def test_gradients_only_on_lora_and_base_untouched(unet, inputs):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        base_out = run(unet, inputs)
    params = add_lora(unet, LoraConfig())
    perturb(params)
    out = run(unet, inputs)
    assert not torch.allclose(out, base_out)
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        if "lora_" not in name:
            assert p.grad is None, name
    assert all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for n, p in lora_parameters(unet) if ".lora_B." in n)
    torch.optim.SGD(params, lr=0.1).step()
    remove_lora(unet)
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---- scale and removal -------------------------------------------------------------------------

def test_scale_zero_and_remove_restore_base(unet, inputs):
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        base = run(unet, inputs)
        perturb(add_lora(unet, LoraConfig()))
        tuned = run(unet, inputs)
        set_lora_scale(unet, 0.0)
        assert torch.equal(run(unet, inputs), base)
        set_lora_scale(unet, 1.0)
        assert torch.equal(run(unet, inputs), tuned)
        remove_lora(unet)
        assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
        assert not hasattr(unet, "peft_config")
        assert type(unet.get_submodule(OUT0)) is torch.nn.Linear
        assert torch.equal(run(unet, inputs), base)
    add_lora(unet, LoraConfig())  # a removed module can take a fresh LoRA again


# ---- files -------------------------------------------------------------------------------------

def test_save_load_apply_round_trip_on_fresh_unet(unet, inputs, tmp_path):
    cfg = LoraConfig(rank=4, alpha=2.0)
    perturb(add_lora(unet, cfg))
    with torch.no_grad():
        expected = run(unet, inputs)
    path = save_lora(tmp_path / "sub" / "run.safetensors", unet, cfg, metadata={"alignprop.steps": "12"})
    assert path.is_file()

    lora = load_lora(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight"
    assert key in lora.state and lora.state[key].shape == (4, 32)
    assert float(lora.state[key.replace("lora_down.weight", "alpha")]) == 2.0
    assert (lora.rank, lora.alpha, lora.target_modules) == (4, 2.0, TARGETS)
    assert lora.metadata["ss_network_module"] == "networks.lora"
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_network_alpha"] == "2.0"
    assert lora.metadata["alignprop.steps"] == "12"

    fresh = make_unet()
    peft_state, rank, alpha = kohya_to_peft(lora.state, fresh)
    assert (rank, alpha) == (4, 2.0)
    assert set(peft_state) == set(lora_state_dict(unet))  # '_' in names mapped back to real paths
    assert f"{OUT0}.lora_B.weight" in peft_state

    apply_lora_file(fresh, lora)
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), expected)
    apply_lora_file(fresh, lora)  # loading into an existing, matching LoRA also works
    load_lora(path, module=fresh)  # validation against a model


def test_save_fp16_dtype(unet, tmp_path):
    cfg = LoraConfig()
    add_lora(unet, cfg)
    lora = load_lora(save_lora(tmp_path / "h.safetensors", unet, cfg, dtype="fp16"))
    assert all(v.dtype == torch.float16 for k, v in lora.state.items() if k.endswith("weight"))
    with pytest.raises(ValueError, match="fp32"):
        save_lora(tmp_path / "x.safetensors", unet, cfg, dtype="int8")


def test_save_is_atomic(unet, tmp_path, monkeypatch):
    cfg = LoraConfig()
    add_lora(unet, cfg)

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(lora_io.st, "save_file", broken_save)
    target = tmp_path / "out" / "lora.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_lora(target, unet, cfg)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_kohya_reverse_mapping_uses_real_module_names():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a_b = torch.nn.ModuleDict({"c": torch.nn.Linear(3, 3)})
            self.a = torch.nn.ModuleDict({"b_d": torch.nn.Linear(3, 3)})

    state = {"a_b.c.lora_A.weight": torch.zeros(2, 3), "a_b.c.lora_B.weight": torch.zeros(3, 2),
             "a.b_d.lora_A.weight": torch.ones(2, 3), "a.b_d.lora_B.weight": torch.ones(3, 2)}
    back, rank, alpha = kohya_to_peft(peft_to_kohya(state, 3.0), Holder())
    assert set(back) == set(state) and (rank, alpha) == (2, 3.0)
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---- mixing ------------------------------------------------------------------------------------

@pytest.fixture
def two_loras():
    cfg_a, cfg_b = LoraConfig(rank=4, alpha=4.0, init_seed=1), LoraConfig(rank=2, alpha=8.0, init_seed=2)
    ua, ub = make_unet(), make_unet()
    perturb(add_lora(ua, cfg_a), seed=1)
    perturb(add_lora(ub, cfg_b), seed=2)
    return lora_file_of(ua, cfg_a), lora_file_of(ub, cfg_b)


def test_mix_weights_endpoints_exact(two_loras):
    a, _ = two_loras
    ub = make_unet()
    cfg = LoraConfig(rank=4, alpha=4.0, init_seed=9)
    perturb(add_lora(ub, cfg), seed=9)
    b = lora_file_of(ub, cfg)
    for t, ref in ((0.0, a), (1.0, b)):
        mixed = mix_loras(a, b, t, "weights")
        assert mixed.state.keys() == ref.state.keys()
        assert all(torch.equal(mixed.state[k], ref.state[k]) for k in ref.state)
    half = mix_loras(a, b, 0.5, "weights")
    k = next(iter(a.state))
    assert torch.allclose(half.state[k], 0.5 * a.state[k] + 0.5 * b.state[k])


def test_mix_delta_is_exact_interpolation_of_delta_w(two_loras, inputs):
    a, b = two_loras
    names = sorted({k.rsplit(".", 2)[0] for k in a.state if k.endswith("lora_down.weight")})
    for t in (0.0, 0.3, 1.0):
        mixed = mix_loras(a, b, t, "delta")
        assert (mixed.rank, mixed.alpha) == (6, 6.0)
        for name in names:
            want = (1 - t) * delta_w(a, name) + t * delta_w(b, name)
            assert torch.allclose(delta_w(mixed, name), want, atol=1e-6), name

    # End to end: the t=0 delta mix, applied to a model, behaves like a itself.
    ua, um = make_unet(), make_unet()
    apply_lora_file(ua, a)
    apply_lora_file(um, mix_loras(a, b, 0.0, "delta"))
    with torch.no_grad():
        assert torch.allclose(run(um, inputs), run(ua, inputs), atol=1e-5)


def test_mix_errors(two_loras, tmp_path):
    a, b = two_loras
    with pytest.raises(ValueError, match="weights, delta"):
        mix_loras(a, b, 0.5, "slerp")
    with pytest.raises(ValueError, match="equal rank"):
        mix_loras(a, b, 0.5, "weights")
    partial = LoraFile(state={k: v for k, v in b.state.items() if "up_blocks" not in k}, rank=2, alpha=8.0)
    with pytest.raises(ValueError, match="different modules"):
        mix_loras(a, partial, 0.5, "delta")
    saved = load_lora(save_lora_file(tmp_path / "mix.safetensors", mix_loras(a, b, 0.5, "delta")))
    assert (saved.rank, saved.alpha, saved.metadata["alignprop.mix_mode"]) == (6, 6.0, "delta")


# ---- res-block (conv) LoRA ---------------------------------------------------------------------

RES_TARGETS = TARGETS + ("conv1", "conv2", "time_emb_proj", "conv_shortcut")


def test_res_block_lora_acts_saves_loads_and_mixes(unet, inputs, tmp_path):
    with torch.no_grad():
        base = run(unet, inputs)
    cfg = LoraConfig(rank=3, alpha=6.0, target_modules=RES_TARGETS)
    params = add_lora(unet, cfg)
    convs = [n for n, p in lora_parameters(unet) if ".resnets." in n and p.dim() == 4]
    assert convs and any(n.endswith("conv_shortcut.lora_A.default.weight") for n in convs)
    perturb(params)
    with torch.no_grad():
        expected = run(unet, inputs)
    assert not torch.allclose(expected, base, atol=1e-4)

    path = save_lora(tmp_path / "res.safetensors", unet, cfg, arch="sd15")
    lora = load_lora(path)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert lora.state[f"{name}.lora_down.weight"].shape == (3, 32, 3, 3)
    assert lora.state[f"{name}.lora_up.weight"].shape == (32, 3, 1, 1)
    fresh = make_unet()
    apply_lora_file(fresh, lora)
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), expected)

    other = make_unet()
    perturb(add_lora(other, LoraConfig(rank=2, alpha=2.0, target_modules=RES_TARGETS, init_seed=5)), seed=8)
    b = lora_file_of(other, LoraConfig(rank=2, alpha=2.0, target_modules=RES_TARGETS))
    mixed = mix_loras(lora, b, 0.3, "delta")
    assert torch.allclose(delta_w(mixed, name), 0.7 * delta_w(lora, name) + 0.3 * delta_w(b, name), atol=1e-6)
    back = make_unet()
    apply_lora_file(back, mix_loras(lora, b, 0.0, "delta"))
    with torch.no_grad():
        assert torch.allclose(run(back, inputs), expected, atol=1e-5)


def test_res_block_targets_reach_ldm_names_with_the_same_init():
    """On an LDM-named UNet, conv1/conv2/time_emb_proj/conv_shortcut target in_layers.2/out_layers.3/
    emb_layers.1/skip_connection, and every adapter starts as on the diffusers twin."""
    cfg = LoraConfig(init_seed=4, target_modules=RES_TARGETS)
    diffusers_unet, view = make_unet(), _ldm_view(make_unet())
    add_lora(diffusers_unet, cfg)
    add_lora(view, cfg)
    d_state, l_state = lora_state_dict(diffusers_unet), lora_state_dict(view)
    pairs = ldm_to_diffusers_paths("sd15", view)
    suffix = ".lora_A.weight"
    l_modules = [k[: -len(suffix)] for k in l_state if k.endswith(suffix)]
    assert any(m.endswith(".in_layers.2") for m in l_modules)
    assert any(m.endswith(".skip_connection") for m in l_modules)
    assert {pairs[m] for m in l_modules} == {k[: -len(suffix)] for k in d_state if k.endswith(suffix)}
    for m in l_modules:
        assert torch.equal(l_state[m + suffix], d_state[pairs[m] + suffix]), m


def test_conv_factors_of_the_wrong_shape_are_refused(tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    bad = {f"{name}.lora_down.weight": torch.zeros(3, 32, 3, 3), f"{name}.lora_up.weight": torch.zeros(32, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"conv factors \(r, in, kh, kw\) and \(out, r, 1, 1\)"):
        save_lora_file(tmp_path / "bad.safetensors", LoraFile(state=bad, rank=3, alpha=3.0))
    assert not (tmp_path / "bad.safetensors").exists()


# ---- bad inputs --------------------------------------------------------------------------------

def test_add_lora_errors(unet):
    with pytest.raises(ValueError, match=r"nonexistent.*down_blocks"):
        add_lora(unet, LoraConfig(target_modules=("nonexistent",)))
    assert not any(p.requires_grad is False for p in unet.parameters())  # nothing done on failure
    with pytest.raises(ValueError, match=r"peft could not inject LoRA into \['attn1'\]"):
        add_lora(unet, LoraConfig(target_modules=("attn1",)))  # matches, but is not a Linear
    assert not lora_parameters(unet) and all(p.requires_grad for p in unet.parameters())
    add_lora(unet, LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(unet, LoraConfig())


def test_state_and_file_errors(unet, tmp_path):
    cfg = LoraConfig()
    add_lora(unet, cfg)
    state = lora_state_dict(unet)
    first = next(iter(state))
    with pytest.raises(ValueError, match=r"missing keys: .*" + first.replace(".", r"\.")):
        set_lora_state_dict(unet, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=r"unexpected keys: foo\.lora_A\.weight"):
        set_lora_state_dict(unet, {**state, "foo.lora_A.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="shapes differ"):
        set_lora_state_dict(unet, {k: (v[:2] if k == first else v) for k, v in state.items()})

    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora(tmp_path / "lora.pt", unet, cfg)
    with pytest.raises(ValueError, match="rank=8"):
        save_lora(tmp_path / "a.safetensors", unet, LoraConfig(rank=8))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(missing)

    import safetensors.torch as st
    st.save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no lora keys"):
        load_lora(tmp_path / "plain.safetensors")
    kohya = peft_to_kohya(state, cfg.alpha)
    with pytest.raises(ValueError, match="lora_te_text_model_x.lora_down.weight"):
        kohya_to_peft({**kohya, "lora_te_text_model_x.lora_down.weight": torch.zeros(4, 8)}, unet)
    with pytest.raises(ValueError, match="lora_unet_no_such_block.*different model"):
        kohya_to_peft({**kohya, "lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 8),
                       "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 4)}, unet)
    odd = dict(kohya)
    odd[next(k for k in kohya if k.endswith(".alpha"))] = torch.tensor(2.0)
    with pytest.raises(ValueError, match="Inconsistent LoRA ranks/alphas"):
        kohya_to_peft(odd, unet)
    with pytest.raises(ValueError, match="remove_lora first"):
        apply_lora_file(unet, LoraFile(state={k: (v * 2 if k.endswith("alpha") else v)
                                              for k, v in kohya.items()}, rank=4, alpha=8.0))
