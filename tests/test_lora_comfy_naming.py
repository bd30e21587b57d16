"""SD3 and FLUX.1 LoRAs trained on ComfyUI's own diffusion models (original module names, fused layers):
the kohya file ``save_lora`` writes, its metadata, and the bit-exact way back onto such a model.

ComfyUI cannot be imported here, so the models are module trees with its names and layer shapes
(``joint_blocks.N.x_block.attn.qkv``, ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``,
...); ``tests/comfyui/test_native_lora_comfy.py`` does the same on the real ComfyUI models and loads
the files through ComfyUI's LoRA loader.
"""
from __future__ import annotations

import copy

import pytest
import safetensors.torch as st
import torch
from torch import nn

from alignprop_core.config import LoraConfig
from alignprop_core.lora import (add_lora, apply_lora_file, check_lora_fits, file_archs, has_lora, load_lora,
                                 lora_state_dict, metadata_arch, mix_loras, model_arch, save_lora, save_lora_file)

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA, H = 2, 3.0, 8  # alpha != rank, so a lost alpha shows
NATIVE = {"sd3": "https://github.com/Stability-AI/sd3.5", "flux": "https://github.com/black-forest-labs/flux"}


def _attention(h: int) -> nn.Module:
    attn = nn.Module()
    attn.qkv, attn.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
    return attn


def _mmdit_half(h: int) -> nn.Module:
    """One stream of an MMDiT joint block (ComfyUI's ``DismantledBlock``)."""
    half = nn.Module()
    half.attn = _attention(h)
    half.mlp = nn.Module()
    half.mlp.fc1, half.mlp.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
    half.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
    return half


def comfy_sd3(h: int = H, blocks: int = 2) -> nn.Module:
    """A module tree with the names and layer shapes of ComfyUI's ``MMDiT`` (no forward)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.x_embedder = nn.Module()
    model.x_embedder.proj = nn.Conv2d(4, h, 2, 2)
    model.joint_blocks = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.x_block, block.context_block = _mmdit_half(h), _mmdit_half(h)
        model.joint_blocks.append(block)
    model.final_layer = nn.Module()
    model.final_layer.linear = nn.Linear(h, 16)
    return model


def comfy_flux(h: int = H) -> nn.Module:
    """A module tree with the names and layer shapes of ComfyUI's ``Flux`` (no forward)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.img_in = nn.Linear(16, h)
    double = nn.Module()
    for stream in ("img", "txt"):
        setattr(double, f"{stream}_attn", _attention(h))
        setattr(double, f"{stream}_mlp", nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)))
    model.double_blocks = nn.ModuleList([double])
    single = nn.Module()
    single.linear1, single.linear2 = nn.Linear(h, 3 * h + 4 * h), nn.Linear(h + 4 * h, h)  # q, k, v, mlp in
    model.single_blocks = nn.ModuleList([single])
    return model


COMFY = {"sd3": comfy_sd3, "flux": comfy_flux}
TARGETS = {"sd3": ("qkv", "proj", "fc1", "fc2"), "flux": ("qkv", "proj", "img_mlp.0", "linear1", "linear2")}


def tuned(arch: str, base: nn.Module | None = None, seed: int = 3,
          targets: tuple[str, ...] | None = None) -> tuple[nn.Module, LoraConfig]:
    model = copy.deepcopy(base) if base is not None else COMFY[arch]()
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets or TARGETS[arch])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in add_lora(model, cfg):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # lora_B non-zero
    return model, cfg


def lora_paths(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_file_holds_kohya_keys_of_the_fused_layers_with_alpha(arch, tmp_path):
    model, cfg = tuned(arch)
    assert model_arch(model) == arch
    paths = lora_paths(model)
    fused = {"sd3": "joint_blocks.0.x_block.attn.qkv", "flux": "double_blocks.0.img_attn.qkv"}[arch]
    assert fused in paths and (arch == "sd3" or "single_blocks.0.linear1" in paths)
    path = save_lora(tmp_path / "c.safetensors", model, cfg, arch=arch)
    state = st.load_file(str(path))
    names = {f"lora_unet_{p.replace('.', '_')}" for p in paths}
    assert set(state) == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    peft = lora_state_dict(model)
    for p in paths:
        n = f"lora_unet_{p.replace('.', '_')}"
        assert torch.equal(state[f"{n}.lora_down.weight"], peft[f"{p}.lora_A.weight"])
        assert torch.equal(state[f"{n}.lora_up.weight"], peft[f"{p}.lora_B.weight"])  # SD3: alpha not folded
        assert state[f"{n}.alpha"].item() == ALPHA and state[f"{n}.alpha"].dtype == torch.float32
    # the key names alone say the family
    assert file_archs(state) == ((arch,), "key names")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_metadata_names_the_family_and_the_native_naming(arch, tmp_path):
    model, cfg = tuned(arch)
    meta = load_lora(save_lora(tmp_path / "m.safetensors", model, cfg, metadata={"alignprop.step": "4"},
                               arch=arch)).metadata
    assert meta["modelspec.architecture"] == {"sd3": "stable-diffusion-3-medium/lora",
                                              "flux": "flux-1-dev/lora"}[arch]
    assert meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[arch] and metadata_arch(meta) == arch
    assert meta["modelspec.implementation"] == NATIVE[arch]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["alignprop.step"]) == ("2", "3.0", "4")
    assert "alignprop.folded_alpha" not in meta
    # without arch the model's family is written all the same
    plain = load_lora(save_lora(tmp_path / "p.safetensors", model, cfg))
    assert metadata_arch(plain.metadata) == arch and plain.metadata["modelspec.implementation"] == NATIVE[arch]


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_save_load_apply_round_trip_is_bit_exact(arch, tmp_path):
    base = COMFY[arch]()
    model, cfg = tuned(arch, base=base)
    lora = load_lora(save_lora(tmp_path / "r.safetensors", model, cfg, arch=arch), module=base)
    assert (lora.rank, lora.alpha, lora.target_modules) == (RANK, ALPHA, TARGETS[arch])
    fresh = copy.deepcopy(base)
    check_lora_fits(lora, fresh)
    apply_lora_file(fresh, lora)
    got, want = lora_state_dict(fresh), lora_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name, layer in fresh.named_modules():
        if hasattr(layer, "lora_A"):
            other = model.get_submodule(name)
            assert torch.equal(layer.get_delta_weight("default"), other.get_delta_weight("default")), name
    # a mix of two such files keeps their keys and family
    other = load_lora(save_lora(tmp_path / "o.safetensors", *tuned(arch, base=base, seed=4), arch=arch))
    mixed = load_lora(save_lora_file(tmp_path / "x.safetensors", mix_loras(lora, other, 0.5, "weights")))
    assert mixed.state.keys() == lora.state.keys() and metadata_arch(mixed.metadata) == arch
    assert mixed.metadata["modelspec.implementation"] == NATIVE[arch]


def test_a_comfy_named_file_of_another_family_or_size_is_refused(tmp_path):
    sd3_lora = load_lora(save_lora(tmp_path / "s.safetensors", *tuned("sd3"), arch="sd3"))
    flux = comfy_flux()
    with pytest.raises(ValueError, match=r"trained for sd3 \(so says its metadata\); the model is flux"):
        apply_lora_file(flux, sd3_lora)
    bare = type(sd3_lora)(state=sd3_lora.state, rank=sd3_lora.rank, alpha=sd3_lora.alpha)
    with pytest.raises(ValueError, match=r"trained for sd3 \(so says its key names\); the model is flux"):
        check_lora_fits(bare, flux)
    wider = comfy_sd3(h=2 * H)
    with pytest.raises(ValueError, match=r"has shape .* but the model layer .* has weight shape"):
        apply_lora_file(wider, sd3_lora)
    assert not (has_lora(flux) or has_lora(wider))
    deeper = load_lora(save_lora(tmp_path / "d.safetensors", *tuned("sd3", base=comfy_sd3(blocks=3)), arch="sd3"))
    with pytest.raises(ValueError, match=r"LoRA module\(s\) are not in the target model: lora_unet_joint_blocks_2"):
        check_lora_fits(deeper, comfy_sd3())


# what the diffusers-named targets reach on the original module names (families.NATIVE_TWINS)
NATIVE_INJECTED = {
    "sd3": {"default": {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
                        "joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.x_block.attn.proj"},
            "joint": {f"joint_blocks.{i}.{s}_block.attn.{p}" for i in (0, 1) for s in ("x", "context")
                      for p in ("qkv", "proj")}},
    "flux": {"default": {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
                         "single_blocks.0.linear1"},
             "joint": {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear1",
                       "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj"}},
}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_diffusers_targets_reach_the_fused_native_layers(arch):
    """The default targets (to_q, to_k, to_v, to_out.0) train the image stream's attention on a
    ComfyUI-named model too, and the joint preset adds the text stream, as on the diffusers model."""
    from alignprop_core.lora import DEFAULT_TARGETS

    def injected(model):
        return {k.removesuffix(".lora_A.weight") for k in lora_state_dict(model) if k.endswith(".lora_A.weight")}

    for preset, targets in (("default", LoraConfig().target_modules), ("joint", DEFAULT_TARGETS[arch])):
        model = COMFY[arch]()
        add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
        assert injected(model) == NATIVE_INJECTED[arch][preset], preset
    # native names given directly still work alone
    model = COMFY[arch]()
    add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=("linear2",) if arch == "flux" else ("fc2",)))
    assert len(injected(model)) == (1 if arch == "flux" else 4)


# native layer -> (its diffusers parts, in output-row order), one per family (native_keys.LAYERS)
CONVERTED = {
    "sd3": {"joint_blocks.1.x_block.attn.qkv": ("transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k",
                                                 "transformer_blocks.1.attn.to_v"),
            "joint_blocks.0.context_block.attn.proj": ("transformer_blocks.0.attn.to_add_out",),
            "joint_blocks.0.x_block.mlp.fc2": ("transformer_blocks.0.ff.net.2",)},
    "flux": {"double_blocks.0.txt_attn.qkv": ("transformer_blocks.0.attn.add_q_proj",
                                              "transformer_blocks.0.attn.add_k_proj",
                                              "transformer_blocks.0.attn.add_v_proj"),
             "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                         "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"),
             "double_blocks.0.img_mlp.0": ("transformer_blocks.0.ff.net.0.proj",)},
}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_native_lora_converts_exactly_to_the_diffusers_form(arch, tmp_path):
    """Each fused layer's update s B A equals its parts' updates stacked in row order (same A, same
    alpha); the converted file is written in the diffusers form (SD3: alpha folded into lora_B)."""
    from alignprop_core.lora import diffusers_lora_file

    # SD3's bare "proj" would also take x_embedder.proj, which has no diffusers twin here
    model, cfg = tuned(arch, targets=("qkv", "attn.proj", "fc1", "fc2") if arch == "sd3" else None)
    native = load_lora(save_lora(tmp_path / "native.safetensors", model, cfg, arch=arch))
    converted, family = diffusers_lora_file(native)
    assert family == arch and diffusers_lora_file(converted)[0] is converted  # already converted: as it is
    state = converted.state
    assert len({k.rsplit(".", 2)[0] for k in state if k.endswith("lora_A.weight")}) > len(lora_paths(model))
    scale = ALPHA / RANK
    for layer, parts in CONVERTED[arch].items():
        kohya = "lora_unet_" + layer.replace(".", "_")
        want = scale * native.state[f"{kohya}.lora_up.weight"] @ native.state[f"{kohya}.lora_down.weight"]
        got = torch.cat([float(state[f"transformer.{p}.alpha"]) / RANK
                         * state[f"transformer.{p}.lora_B.weight"] @ state[f"transformer.{p}.lora_A.weight"]
                         for p in parts])
        assert torch.equal(got, want), layer
    path = save_lora_file(tmp_path / "diffusers.safetensors", converted, arch=arch)
    written = load_lora(path)
    assert all(k.startswith("transformer.") for k in written.state)
    assert any(k.endswith(".alpha") for k in written.state) == (arch == "flux")  # diffusers' SD3 loader takes none
    with st.safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.implementation"] == "diffusers"


def test_layers_without_a_diffusers_twin_are_refused_by_name(tmp_path):
    from alignprop_core.lora import diffusers_lora_file

    model = COMFY["sd3"]()
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=("qkv", "adaLN_modulation.1"))
    add_lora(model, cfg)
    native = load_lora(save_lora(tmp_path / "native.safetensors", model, cfg, arch="sd3"))
    with pytest.raises(ValueError, match="no diffusers twin here .*adaLN_modulation_1"):
        diffusers_lora_file(native)
    with pytest.raises(ValueError, match="this LoRA is for sdxl; the diffusers key format applies to SD3"):
        diffusers_lora_file(native, "sdxl")
