"""LoRA on SD3 and FLUX.1 transformers (alignprop_core.lora): injection, files that diffusers and ComfyUI
load whole, alpha, metadata, round trips and the refusal of another family's LoRA.

diffusers is checked end to end: a file we write goes through ``pipe.load_lora_weights`` of a
``StableDiffusion3Pipeline`` / ``FluxPipeline`` with no key left over, and the transformer then
computes what our LoRA-injected one computes. ComfyUI cannot be imported here, so its side is
checked against rules read from its source: the LoRA key map of ``comfy/lora.py``
``model_lora_keys_unet`` (SD3 and Flux branches, over ``comfy/utils.py`` ``mmdit_to_diffusers`` and
``flux_to_diffusers``) and the arithmetic of ``comfy/weight_adapter/lora.py`` ``LoRAAdapter``
(read from current ComfyUI; the entries used here are older than 0.3.75: the ``.lora_B.weight``
form was in ``comfy/lora.py`` ``load_lora`` before the weight adapters were split out).
``tests/comfyui/test_lora_flow_comfy.py`` loads the same files in the real ComfyUI 0.3.75.
"""
from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager

import pytest
import safetensors.torch as st
import torch
from tiny_flow_transformers import flux_inputs, make_flux, make_sd3, run_transformer, sd3_inputs
from tiny_models import make_unet

from alignprop_core.config import LoraConfig
from alignprop_core.lora import (DEFAULT_TARGETS, LoraFile, add_lora, apply_lora_file, check_lora_fits, has_lora,
                                 load_lora, lora_preset, lora_state_dict, metadata_arch, mix_loras, model_arch,
                                 peft_to_diffusers, save_lora, save_lora_file)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("sd3", "flux")
MAKE = {"sd3": make_sd3, "flux": make_flux}
INPUTS = {"sd3": sd3_inputs, "flux": flux_inputs}
RANK = 2

# ---- ComfyUI's rules, read from its source -------------------------------------------------------
# comfy/utils.py mmdit_to_diffusers: the diffusers weights of every SD3 joint block and of the model
# that ComfyUI maps onto its MMDiT (q/k/v as slices of the fused qkv).
SD3_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn.to_add_out", "ff_context.net.0.proj",
             "ff_context.net.2", "attn.norm_added_q", "attn.norm_added_k", "norm1.linear",
             "norm1_context.linear", "attn.to_out.0", "attn.norm_q", "attn.norm_k", "attn2.to_out.0",
             "attn2.norm_q", "attn2.norm_k", "ff.net.0.proj", "ff.net.2")
SD3_BASIC = ("context_embedder", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "pos_embed.proj", "time_text_embed.text_embedder.linear_1",
             "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out")
# comfy/utils.py flux_to_diffusers: the same for FLUX's double and single blocks.
FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj",
               "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "attn.norm_q", "attn.norm_k",
               "attn.norm_added_q", "attn.norm_added_k")
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out", "attn.norm_q",
               "attn.norm_k")
FLUX_BASIC = ("proj_out", "x_embedder", "time_text_embed.timestep_embedder.linear_1",
              "time_text_embed.timestep_embedder.linear_2", "context_embedder",
              "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
              "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
              "norm_out.linear")


def comfy_key_map(arch: str, config) -> set[str]:
    """The LoRA module names ComfyUI's ``model_lora_keys_unet`` accepts in diffusers form on an SD3 or
    Flux model: ``"transformer." + <diffusers weight name less ".weight">`` for every weight of
    ``mmdit_to_diffusers`` / ``flux_to_diffusers`` (its "regular diffusers ... lora format" entries)."""
    if arch == "sd3":
        names = [f"transformer_blocks.{i}.{s}" for i in range(config.num_layers) for s in SD3_BLOCK]
        names += SD3_BASIC
    else:
        names = [f"transformer_blocks.{i}.{s}" for i in range(config.num_layers) for s in FLUX_DOUBLE]
        names += [f"single_transformer_blocks.{i}.{s}" for i in range(config.num_single_layers)
                  for s in FLUX_SINGLE]
        names += FLUX_BASIC
    return {f"transformer.{n}" for n in names}


def comfy_loaded_keys(state: dict, key_map: set[str]) -> set[str]:
    """The keys ComfyUI's ``comfy.lora.load_lora`` consumes: per mapped name x, ``x.alpha`` and the
    ``LoRAAdapter.load`` pair ``x.lora_B.weight`` (up) / ``x.lora_A.weight`` (down); any other key is
    logged "lora key not loaded" and skipped."""
    loaded = set()
    for x in key_map:
        if f"{x}.alpha" in state:
            loaded.add(f"{x}.alpha")
        if f"{x}.lora_B.weight" in state:
            loaded |= {f"{x}.lora_B.weight", f"{x}.lora_A.weight"}
    return loaded


def comfy_delta(state: dict, x: str) -> torch.Tensor:
    """``LoRAAdapter.calculate_weight`` at strength 1: ``up @ down`` times alpha / rank, or times 1
    without an ``.alpha`` key."""
    up, down = state[f"{x}.lora_B.weight"].double(), state[f"{x}.lora_A.weight"].double()
    scale = state[f"{x}.alpha"].item() / down.shape[0] if f"{x}.alpha" in state else 1.0
    return scale * (up.flatten(1) @ down.flatten(1))


# ---- helpers ----------------------------------------------------------------------------------------

def linear_paths(model) -> tuple[str, ...]:
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def tuned(arch: str, alpha: float = 3.0, targets=None, base=None, seed: int = 3):
    """A copy of ``base`` (default: the tiny model) with a random, non-zero LoRA."""
    model = copy.deepcopy(base) if base is not None else MAKE[arch]()
    cfg = lora_preset(LoraConfig(rank=RANK, alpha=alpha), arch)
    if targets is not None:
        cfg = LoraConfig(rank=RANK, alpha=alpha, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in add_lora(model, cfg):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, cfg


def run(arch: str, model) -> torch.Tensor:
    return run_transformer(model, INPUTS[arch](model))


def make_pipeline(arch: str, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    # Only the transformer matters to LoRA loading; diffusers allows the other components to be None.
    empty = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)
    if arch == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, text_encoder_3=None, tokenizer_3=None, **empty)
    return FluxPipeline(transformer=transformer, **empty)


@contextmanager
def captured_messages():
    """Every warning and every diffusers/peft log record at WARNING or above."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# ---- injection ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_preset_targets_both_attention_streams_and_the_lora_acts(arch):
    base = MAKE[arch]()
    model = copy.deepcopy(base)
    cfg = lora_preset(LoraConfig(rank=RANK, alpha=3.0, init_seed=5), arch)
    assert cfg.target_modules == DEFAULT_TARGETS[arch] and (cfg.rank, cfg.alpha, cfg.init_seed) == (RANK, 3.0, 5)
    params = add_lora(model, cfg)
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {n for n in linear_paths(base) if n.rsplit(".", 1)[-1] in
                ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
                or n.endswith("attn.to_out.0") or n.endswith("attn2.to_out.0")}
    assert wrapped == expected
    assert any(".add_q_proj" in n for n in wrapped) and any(".to_add_out" in n for n in wrapped)
    if arch == "flux":
        assert {f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")} <= wrapped
    assert torch.equal(run(arch, model), run(arch, base))  # lora_B starts at zero
    with torch.no_grad():
        for p in params:
            p.add_(0.2)
    assert not torch.allclose(run(arch, model), run(arch, base), atol=1e-3)
    assert model_arch(base) == arch


# ---- files through diffusers --------------------------------------------------------------------------

@pytest.mark.parametrize("arch,alpha", [("sd3", 2.0), ("sd3", 3.0), ("flux", 2.0), ("flux", 3.0)])
def test_diffusers_pipeline_loads_every_key_and_matches(arch, alpha, tmp_path):
    """alpha 3 != rank 2: SD3 files fold alpha / rank into lora_B, FLUX files keep '.alpha' keys."""
    from peft.tuners.lora import LoraLayer

    base = MAKE[arch]()
    model, cfg = tuned(arch, alpha, base=base)
    path = save_lora(tmp_path / "lora.safetensors", model, cfg, arch=arch)
    keys = list(st.load_file(str(path)))
    assert all(k.startswith("transformer.") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) == (arch == "flux")

    pipe = make_pipeline(arch, copy.deepcopy(base))
    with captured_messages() as messages:
        pipe.load_lora_weights(str(path))
    # The one expected notice: the file has no text-encoder keys (and this pipeline no text encoders).
    others = [m for m in messages if not m.startswith("No LoRA keys associated to")]
    assert not others, others
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert loaded == {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = run(arch, pipe.transformer)
    assert torch.allclose(out, run(arch, model), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, run(arch, base), atol=1e-3)  # the LoRA does act


# ---- files through ComfyUI's rules -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_every_key_is_in_comfyuis_key_map_and_alpha_is_honoured(arch, tmp_path):
    base = MAKE[arch]()
    model, cfg = tuned(arch, alpha=3.0, targets=linear_paths(base), base=base)  # every linear layer
    lora = load_lora(save_lora(tmp_path / "all.safetensors", model, cfg, arch=arch))
    key_map = comfy_key_map(arch, base.config)
    assert comfy_loaded_keys(lora.state, key_map) == set(lora.state)  # no "lora key not loaded"
    # The weight update ComfyUI computes from the file is the one our LoRA layers apply.
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A"):
            ours = layer.get_delta_weight("default").double()
            assert torch.allclose(comfy_delta(lora.state, f"transformer.{name}"), ours, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_names_family_base_model_and_settings(arch, tmp_path):
    model, cfg = tuned(arch)
    extra = {"alignprop.base_model": f"tiny-{arch}", "alignprop.step": "7"}
    meta = load_lora(save_lora(tmp_path / "m.safetensors", model, cfg, metadata=extra, arch=arch)).metadata
    architecture = {"sd3": "stable-diffusion-3-medium/lora", "flux": "flux-1-dev/lora"}[arch]
    assert meta["modelspec.architecture"] == architecture and metadata_arch(meta) == arch
    assert meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[arch]
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "1024x1024"
    assert (meta["alignprop.base_model"], meta["alignprop.step"]) == (f"tiny-{arch}", "7")
    assert meta["alignprop.lora_target_modules"] == '["' + '", "'.join(DEFAULT_TARGETS[arch]) + '"]'
    # the alpha each file states is the one its tensors use; SD3 records the trained one as folded
    assert meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == {"sd3": "2.0", "flux": "3.0"}[arch]
    assert meta.get("alignprop.folded_alpha") == {"sd3": "3.0", "flux": None}[arch]
    # no arch: a diffusers SD3/FLUX transformer is written as its family all the same
    plain = load_lora(save_lora(tmp_path / "p.safetensors", model, cfg))
    assert metadata_arch(plain.metadata) == arch and plain.state.keys() == load_lora(
        tmp_path / "m.safetensors").state.keys()


# ---- round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,alpha", [("sd3", 2.0), ("flux", 2.0), ("flux", 3.0)])
def test_save_load_apply_round_trip_is_bit_exact(arch, alpha, tmp_path):
    base = MAKE[arch]()
    model, cfg = tuned(arch, alpha, base=base)
    path = save_lora(tmp_path / "a.safetensors", model, cfg, arch=arch)
    lora = load_lora(path, module=base)
    with_alpha = alpha if arch == "flux" else None
    expected = peft_to_diffusers(lora_state_dict(model), with_alpha)
    assert lora.state.keys() == expected.keys()
    assert all(torch.equal(lora.state[k], expected[k]) for k in expected)
    assert (lora.rank, lora.alpha, lora.target_modules) == (RANK, alpha, DEFAULT_TARGETS[arch])
    fresh = copy.deepcopy(base)
    check_lora_fits(lora, fresh)
    apply_lora_file(fresh, lora)
    got, want = lora_state_dict(fresh), lora_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(run(arch, fresh), run(arch, model))
    again = load_lora(save_lora_file(tmp_path / "b.safetensors", lora))  # a loaded file saves unchanged
    assert all(torch.equal(again.state[k], lora.state[k]) for k in lora.state) and again.state.keys() == lora.state.keys()


def test_sd3_folded_alpha_round_trips_to_the_same_outputs(tmp_path):
    base = make_sd3()
    model, cfg = tuned("sd3", alpha=3.0, base=base)
    lora = load_lora(save_lora(tmp_path / "f.safetensors", model, cfg, arch="sd3"))
    assert (lora.rank, lora.alpha) == (RANK, float(RANK)) and not any(k.endswith(".alpha") for k in lora.state)
    fresh = copy.deepcopy(base)
    apply_lora_file(fresh, lora)
    assert torch.allclose(run("sd3", fresh), run("sd3", model), atol=1e-6, rtol=1e-5)
    # A diffusers-form LoRA whose own metadata says SD3 is folded whatever writes it (e.g. a mix).
    unfolded = LoraFile(state=peft_to_diffusers(lora_state_dict(model), 3.0), rank=RANK, alpha=3.0,
                        metadata={"modelspec.architecture": "stable-diffusion-3-medium/lora"})
    written = load_lora(save_lora_file(tmp_path / "g.safetensors", unfolded))
    assert written.state.keys() == lora.state.keys()
    assert all(torch.equal(written.state[k], lora.state[k]) for k in lora.state)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixing_keeps_the_form_the_family_and_diffusers_loadability(arch, tmp_path):
    a = load_lora(save_lora(tmp_path / "a.safetensors", *tuned(arch, seed=1), arch=arch))
    b = load_lora(save_lora(tmp_path / "b.safetensors", *tuned(arch, seed=2), arch=arch))
    for mode in ("weights", "delta"):
        mixed = load_lora(save_lora_file(tmp_path / f"{mode}.safetensors", mix_loras(a, b, 0.25, mode)))
        factors = {k for k in mixed.state if not k.endswith(".alpha")}
        assert factors == {k for k in a.state if not k.endswith(".alpha")}
        assert metadata_arch(mixed.metadata) == arch
        # diffusers' SD3 loader refuses any key without "lora" in it, so SD3 mixes have no '.alpha'
        assert any(k.endswith(".alpha") for k in mixed.state) == (arch == "flux")
        fresh = MAKE[arch]()
        apply_lora_file(fresh, mixed)
        assert has_lora(fresh)


# ---- what does not fit ---------------------------------------------------------------------------------

def test_a_lora_for_other_layer_sizes_is_refused_before_injection(tmp_path):
    lora = load_lora(save_lora(tmp_path / "f.safetensors", *tuned("flux"), arch="flux"))
    wider = make_flux(num_attention_heads=3)  # 24 features per token instead of 16
    with pytest.raises(ValueError, match=r"has shape .* but the model layer .* has weight shape"):
        apply_lora_file(wider, lora)
    assert not has_lora(wider)


def _unet_lora(arch: str, tmp_path, metadata: bool = True) -> LoraFile:
    unet = make_unet()
    cfg = LoraConfig(rank=RANK, alpha=2.0)
    add_lora(unet, cfg)
    lora = load_lora(save_lora(tmp_path / f"{arch}.safetensors", unet, cfg, arch=arch))
    return lora if metadata else LoraFile(state=lora.state, rank=lora.rank, alpha=lora.alpha)


def test_a_lora_of_another_family_is_refused_naming_both(tmp_path):
    flux, sd3, unet = make_flux(), make_sd3(), make_unet()
    sdxl_lora = _unet_lora("sdxl", tmp_path)
    flux_lora = load_lora(save_lora(tmp_path / "flux.safetensors", *tuned("flux"), arch="flux"))
    sd3_lora = load_lora(save_lora(tmp_path / "sd3.safetensors", *tuned("sd3"), arch="sd3"))
    before = {k: v.clone() for k, v in flux.state_dict().items()}
    cases = [(sdxl_lora, flux, "sdxl .so says its metadata.; the model is flux: give a LoRA trained on flux, or none"),
             (flux_lora, unet, "flux .so says its metadata.; the model is sd15: give a LoRA trained on sd15"),
             (sd3_lora, flux, "sd3 .so says its metadata.; the model is flux"),
             (flux_lora, sd3, "flux .so says its metadata.; the model is sd3")]
    for lora, model, message in cases:
        with pytest.raises(ValueError, match="This LoRA was trained for " + message):
            check_lora_fits(lora, model)
        with pytest.raises(ValueError, match="This LoRA was trained for " + message):
            apply_lora_file(model, lora)
        assert not has_lora(model)
    assert all(torch.equal(before[k], v) for k, v in flux.state_dict().items())
    with pytest.raises(ValueError, match="trained for sdxl .so says its metadata.; the model is flux"):
        load_lora(tmp_path / "sdxl.safetensors", module=flux)
    # Without metadata the key names tell: UNet names, FLUX's single blocks.
    bare_unet = _unet_lora("sd15", tmp_path, metadata=False)
    with pytest.raises(ValueError, match=r"trained for sd15 or sdxl \(so says its key names\); the model is sd3"):
        apply_lora_file(sd3, bare_unet)
    bare_flux = LoraFile(state=flux_lora.state, rank=flux_lora.rank, alpha=flux_lora.alpha)
    with pytest.raises(ValueError, match=r"trained for flux \(so says its key names\); the model is sd3"):
        apply_lora_file(sd3, bare_flux)
    with pytest.raises(ValueError, match=r"trained for flux \(so says its key names\); the model is sd15"):
        apply_lora_file(unet, bare_flux)
    assert not (has_lora(sd3) or has_lora(unet))


def test_model_family_from_diffusers_and_comfyui_names():
    def tree(*paths: str) -> torch.nn.Module:
        root = torch.nn.Module()
        for path in paths:
            node = root
            for part in path.split("."):
                if not hasattr(node, part):
                    node.add_module(part, torch.nn.Module())
                node = getattr(node, part)
        return root

    assert model_arch(make_sd3()) == "sd3" and model_arch(make_flux()) == "flux"
    assert model_arch(make_flux(num_single_layers=0)) == "flux"
    assert model_arch(make_unet()) == "sd15"
    assert model_arch(tree("joint_blocks.0.x_block.attn.qkv", "x_embedder.proj")) == "sd3"  # ComfyUI MMDiT
    assert model_arch(tree("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")) == "flux"  # ComfyUI Flux
    assert model_arch(tree("input_blocks.1.1.proj_in", "label_emb.0.0")) == "sdxl"
    assert model_arch(tree("input_blocks.1.1.proj_in")) == "sd15"
    assert model_arch(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_save_errors_name_the_fix(tmp_path):
    model, cfg = tuned("flux")
    with pytest.raises(ValueError, match="arch='sd3' but the module is of the flux family"):
        save_lora(tmp_path / "x.safetensors", model, cfg, arch="sd3")
    with pytest.raises(ValueError, match="naming='ldm' chooses between UNet namings; flux files"):
        save_lora(tmp_path / "x.safetensors", model, cfg, arch="flux", naming="ldm")
    flux_kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 4),
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(12, RANK)}
    with pytest.raises(ValueError, match="arch='sd3' but the LoRA's module names are those of flux"):
        save_lora_file(tmp_path / "x.safetensors", LoraFile(state=flux_kohya, rank=RANK, alpha=float(RANK)),
                       arch="sd3")
    with pytest.raises(ValueError, match="Unknown LoRA keys .*one key form per file"):
        save_lora_file(tmp_path / "x.safetensors", LoraFile(
            state={**peft_to_diffusers(lora_state_dict(model)), "lora_unet_x.lora_down.weight": torch.zeros(2, 2)},
            rank=RANK, alpha=3.0))
    assert not list(tmp_path.iterdir())
