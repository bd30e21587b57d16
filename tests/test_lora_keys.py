"""LoRA module naming (alignprop_core.lora.keys, .unet_paths): LDM <-> diffusers UNet paths, and files that
diffusers, ComfyUI and A1111/Forge load whole.

The diffusers side is checked end to end: a file we write is loaded by ``pipe.load_lora_weights``
(kohya conversion, and for SDXL the sgm/LDM block remapping) with no key left over, and the UNet
then computes exactly what our LoRA-injected UNet computes. ComfyUI cannot be imported here, so
the LDM side is checked against (a) pairs taken from ComfyUI's ``comfy.utils.unet_to_diffusers``
for the full SD1.5 and SDXL configs and (b) the module names of ComfyUI's ``UNetModel``, rebuilt
in ``ldm_module_names`` from its construction order (openaimodel.py).
"""
from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager

import pytest
import safetensors.torch as st
import torch

from alignprop_core.config import LoraConfig
from alignprop_core.lora import (CANONICAL_NAMING, RESNET_LAYERS, UNetLayout, add_lora, apply_lora_file,
                                 convert_names, kohya_name, ldm_to_diffusers_paths, load_lora, lora_metadata,
                                 naming_of, save_lora, unet_layout)

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TARGETS = {"sd15": ATTN, "sdxl": ATTN + ("proj_in", "proj_out")}  # SD1.x proj_in/out are 1x1 convs
RES = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")  # res-block layers (diffusers names)
TEXT_WIDTH, POOLED_WIDTH, TIME_EMBED = 16, 16, 8
UNET_CONFIGS = {
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_EMBED,
                 projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED),
}
# The same tiny UNets as ComfyUI's model detection describes them (checked against detect_unet_config).
COMFY_TINY = {
    "sd15": dict(num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 0],
                 transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2),
}
COMFY_FULL = {  # comfy/supported_models.py SDXL, and SD1.5 as detected from its checkpoint
    "sd15": dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10),
}
# (LDM path, diffusers path) pairs read off ComfyUI's comfy.utils.unet_to_diffusers for the full models
# (ComfyUI 0.3.75; the res-block pairs from its UNET_MAP_RESNET).
FULL_SAMPLES = {
    "sd15": [
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("input_blocks.2.1.proj_in", "down_blocks.0.attentions.1.proj_in"),
        ("input_blocks.4.1.transformer_blocks.0.attn2.to_k",
         "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("input_blocks.8.1.transformer_blocks.0.ff.net.2",
         "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
        ("middle_block.1.transformer_blocks.0.attn2.to_out.0",
         "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("output_blocks.3.1.transformer_blocks.0.attn1.to_k",
         "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"),
        ("output_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
         "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"),
        ("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
        ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks.11.0.in_layers.2", "down_blocks.3.resnets.1.conv1"),
        ("middle_block.0.out_layers.3", "mid_block.resnets.0.conv2"),
        ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
        ("output_blocks.0.0.out_layers.3", "up_blocks.0.resnets.0.conv2"),
        ("output_blocks.11.0.skip_connection", "up_blocks.3.resnets.2.conv_shortcut"),
    ],
    "sdxl": [
        ("input_blocks.4.1.transformer_blocks.1.attn2.to_k",
         "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
        ("input_blocks.8.1.transformer_blocks.9.ff.net.0.proj",
         "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"),
        ("middle_block.1.transformer_blocks.9.attn1.to_v",
         "mid_block.attentions.0.transformer_blocks.9.attn1.to_v"),
        ("output_blocks.0.1.transformer_blocks.0.attn1.to_q",
         "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("output_blocks.2.1.transformer_blocks.9.attn2.to_v",
         "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v"),
        ("output_blocks.3.1.proj_in", "up_blocks.1.attentions.0.proj_in"),
        ("output_blocks.5.1.transformer_blocks.1.attn2.to_out.0",
         "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0"),
        ("input_blocks.7.0.in_layers.2", "down_blocks.2.resnets.0.conv1"),
        ("output_blocks.3.0.emb_layers.1", "up_blocks.1.resnets.0.time_emb_proj"),
        ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ],
}
FULL_ABSENT = {"sd15": ("input_blocks.3.1.proj_in", "input_blocks.10.1.proj_in", "output_blocks.2.1.proj_in"),
               "sdxl": ("input_blocks.1.1.proj_in", "input_blocks.4.1.transformer_blocks.2.attn1.to_q",
                        "output_blocks.6.1.proj_in")}
LINEARS_PER_BLOCK = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "ff.net.0.proj", "ff.net.2"]


# ---- models ------------------------------------------------------------------------------------

def make_unet(arch: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
                                    attention_head_dim=8, **UNET_CONFIGS[arch])
    return unet.eval().requires_grad_(False)


def make_pipeline(arch: str, unet, tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from alignprop_core.models.tiny_model import TINY_SCHEDULER_CONFIG

    def text_config(width):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              projection_dim=POOLED_WIDTH, num_hidden_layers=1, num_attention_heads=2,
                              max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
        scheduler = DDIMScheduler(**{k: v for k, v in TINY_SCHEDULER_CONFIG.items() if k != "_class_name"})
        if arch == "sd15":
            return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config(32)),
                                           tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config(TEXT_WIDTH)),
                                         text_encoder_2=CLIPTextModelWithProjection(text_config(TEXT_WIDTH)),
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=scheduler)




@pytest.fixture(scope="module")
def tokenizer():
    from alignprop_core.models.tiny_model import build_tiny_tokenizer

    return build_tiny_tokenizer()


def run(unet, arch: str):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, 4, H, W) latents
    c = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)  # (B, tokens, width) context
    extra = {}
    if arch == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, POOLED_WIDTH, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), c, **extra).sample


def randomise(params, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def tuned_unet(arch: str, base=None, targets=None):
    unet = copy.deepcopy(base) if base is not None else make_unet(arch)
    cfg = LoraConfig(rank=4, alpha=2.0, target_modules=targets or TARGETS[arch])
    randomise(add_lora(unet, cfg))
    return unet, cfg


@contextmanager
def captured_messages():
    """Every warning and every diffusers/peft/transformers log record at WARNING or above."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
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


# ---- ComfyUI's LDM UNetModel module names (rebuilt from comfy/ldm/.../openaimodel.py) ------------

def ldm_module_names(cfg: dict) -> list[str]:
    """Module names of ComfyUI's UNetModel for a ComfyUI unet_config, in its construction order."""
    depth_in, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    res, levels = cfg["num_res_blocks"], len(cfg["num_res_blocks"])

    def transformer(prefix: str, depth: int) -> list[str]:
        return [f"{prefix}.proj_in", f"{prefix}.proj_out"] + [
            f"{prefix}.transformer_blocks.{t}.{s}" for t in range(depth) for s in LINEARS_PER_BLOCK]

    def res_block(prefix: str) -> list[str]:  # ComfyUI's ResBlock always has a skip_connection
        return [f"{prefix}.{layer}" for layer in RESNET_LAYERS]

    names, n = ["input_blocks.0.0"], 1
    for level in range(levels):
        for _ in range(res[level]):
            names += res_block(f"input_blocks.{n}.0")
            depth = depth_in.pop(0)
            names += transformer(f"input_blocks.{n}.1", depth) if depth else []
            n += 1
        if level != levels - 1:
            names.append(f"input_blocks.{n}.0.op")
            n += 1
    names += res_block("middle_block.0")
    if cfg["transformer_depth_middle"] >= 0:
        names += transformer("middle_block.1", cfg["transformer_depth_middle"]) + res_block("middle_block.2")
    n = 0
    for level in reversed(range(levels)):
        for i in range(res[level] + 1):
            names += res_block(f"output_blocks.{n}.0")
            depth = depth_out.pop()
            names += transformer(f"output_blocks.{n}.1", depth) if depth else []
            if level and i == res[level]:
                names.append(f"output_blocks.{n}.{2 if depth else 1}.conv")
            n += 1
    return names


def block_leaves(names) -> set[str]:
    """The transformer and res-block layers among LDM module names (what the path map covers)."""
    return {n for n in names if n.endswith(("proj_in", "proj_out") + tuple(RESNET_LAYERS))
            or ".transformer_blocks." in n}


def module_tree(leaves: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A module whose submodules sit at the given dotted paths (containers made as needed)."""
    root = torch.nn.Module()
    for path, leaf in leaves.items():
        parent = root
        *parents, last = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, leaf)
    return root


def fake_ldm_unet(arch: str, diffusers_unet) -> torch.nn.Module:
    """An LDM-named stand-in for ComfyUI's UNetModel: its transformer linears and res-block layers are
    copies of the diffusers UNet's (matched through ComfyUI's block order), everything else (and a
    skip_connection where diffusers has no conv_shortcut, as in ComfyUI) is an Identity."""
    to_diffusers = ldm_to_diffusers_paths(arch, COMFY_TINY[arch])
    have = dict(diffusers_unet.named_modules())
    leaves = {}
    for name in ldm_module_names(COMFY_TINY[arch]):
        source = have.get(to_diffusers.get(name))
        layer = isinstance(source, (torch.nn.Linear, torch.nn.Conv2d))
        leaves[name] = copy.deepcopy(source) if layer else torch.nn.Identity()
    return module_tree(leaves)


def assert_same_modules(ldm, diffusers, arch: str, paths) -> None:
    """Each LDM linear or conv (with its LoRA) maps inputs exactly like its diffusers counterpart."""
    g = torch.Generator().manual_seed(5)
    pairs = ldm_to_diffusers_paths(arch, COMFY_TINY[arch])
    for path in paths:
        a, b = ldm.get_submodule(path), diffusers.get_submodule(pairs[path])
        base = b.get_base_layer() if hasattr(b, "get_base_layer") else b
        shape = (3, base.in_features) if isinstance(base, torch.nn.Linear) else (3, base.in_channels, 6, 6)
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), atol=1e-6), path


# ---- the path map --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_model_paths_match_comfyui(arch):
    paths = ldm_to_diffusers_paths(arch)
    for ldm, diffusers in FULL_SAMPLES[arch]:
        assert paths[ldm] == diffusers
    assert not any(p in paths for p in FULL_ABSENT[arch])
    # transformers x (proj_in, proj_out) + transformer blocks x 10 linears + res blocks x 4 layers
    assert len(paths) == {"sd15": 16 * 2 + 16 * 10 + 22 * 4, "sdxl": 11 * 2 + 70 * 10 + 17 * 4}[arch]
    assert ldm_to_diffusers_paths(arch, COMFY_FULL[arch]) == paths
    assert set(paths) == block_leaves(ldm_module_names(COMFY_FULL[arch]))
    fake = module_tree({n: torch.nn.Identity() for n in ldm_module_names(COMFY_FULL[arch])})
    assert unet_layout(fake) == unet_layout(None, arch)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_layouts_agree_from_every_source(arch):
    unet = make_unet(arch)
    layout = unet_layout(unet.config)
    assert layout == unet_layout(unet) == unet_layout(COMFY_TINY[arch]) == unet_layout(dict(unet.config))
    expected = {"sd15": UNetLayout(down=((1,), (0,)), up=((1, 1), (0, 0)), mid=1),
                "sdxl": UNetLayout(down=((0, 0), (1, 1), (2, 2)), up=((0, 0, 0), (1, 1, 1), (2, 2, 2)),
                                   mid=2)}
    assert layout == expected[arch]
    paths = ldm_to_diffusers_paths(arch, unet)
    assert paths == ldm_to_diffusers_paths(arch, COMFY_TINY[arch])
    ldm_names = ldm_module_names(COMFY_TINY[arch])
    assert set(paths) == block_leaves(ldm_names)
    assert unet_layout(module_tree({n: torch.nn.Identity() for n in ldm_names})) == layout
    layers = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    real = {n for n in layers if ".attentions." in n or (".resnets." in n and n.endswith(RES))}
    # every diffusers transformer linear/1x1 conv and res-block layer; the only extras are the
    # conv_shortcuts of res blocks that keep their channels (ComfyUI's Identity skip_connection)
    assert real <= set(paths.values())
    assert all(p.endswith(".conv_shortcut") for p in set(paths.values()) - real)


# ---- files through diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,naming,res", [("sd15", None, False), ("sdxl", None, False),
                                             ("sd15", "ldm", False), ("sdxl", "diffusers", False),
                                             ("sd15", None, True), ("sdxl", None, True)])
def test_diffusers_pipeline_loads_every_key_and_matches(arch, naming, res, tokenizer, tmp_path):
    """res: the LoRA also covers the res blocks (conv1, conv2, time_emb_proj, conv_shortcut)."""
    from peft.tuners.lora import LoraLayer

    base = make_unet(arch)
    tuned, cfg = tuned_unet(arch, base, TARGETS[arch] + RES if res else None)
    path = save_lora(tmp_path / "lora.safetensors", tuned, cfg, arch=arch, naming=naming)
    keys = list(st.load_file(str(path)))
    assert naming_of(keys) == (naming or CANONICAL_NAMING[arch])

    pipe = make_pipeline(arch, base, tokenizer)
    # The SD1.x loader only remaps LDM block names when told the UNet config (SDXL's always is).
    extra = {"unet_config": base.config} if (arch, naming) == ("sd15", "ldm") else {}
    with captured_messages() as messages:
        pipe.load_lora_weights(str(path), **extra)
    # The one expected notice: the file has no text-encoder keys. Anything else (unexpected or
    # unloaded keys, skipped modules) fails.
    others = [m for m in messages if not m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not others, others
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(keys) // 3
    out = run(pipe.unet, arch)
    assert torch.allclose(out, run(tuned, arch), atol=1e-5)
    assert not torch.allclose(out, run(make_unet(arch), arch), atol=1e-3)  # the LoRA does act


def test_sdxl_file_round_trips_into_a_diffusers_unet(tmp_path):
    tuned, cfg = tuned_unet("sdxl")
    path = save_lora(tmp_path / "xl.safetensors", tuned, cfg, arch="sdxl")
    lora = load_lora(path, module=make_unet("sdxl"))  # validation renames LDM -> diffusers
    ldm_prefixes = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    assert all(k.startswith(ldm_prefixes) for k in lora.state)
    fresh = make_unet("sdxl")
    apply_lora_file(fresh, lora)
    assert torch.equal(run(fresh, "sdxl"), run(tuned, "sdxl"))


# ---- files on the LDM (ComfyUI) side ---------------------------------------------------------------

def test_sd15_file_from_diffusers_applies_to_an_ldm_unet(tmp_path):
    tuned, cfg = tuned_unet("sd15")
    path = save_lora(tmp_path / "sd15.safetensors", tuned, cfg, arch="sd15")
    ldm = fake_ldm_unet("sd15", make_unet("sd15"))
    lora = load_lora(path, module=ldm)
    assert naming_of(lora.state) == "diffusers"
    apply_lora_file(ldm, lora)
    trained = sorted(n for n, _ in ldm.named_modules() if n.endswith(ATTN))
    assert trained and all(n.startswith(("input_blocks.1.1", "middle_block.1", "output_blocks."))
                           for n in trained)
    assert_same_modules(ldm, tuned, "sd15", trained)


@pytest.mark.parametrize("arch,res", [("sd15", False), ("sdxl", False), ("sd15", True), ("sdxl", True)])
def test_lora_trained_on_an_ldm_unet_saves_canonical_names(arch, res, tmp_path):
    diffusers_base = make_unet(arch)
    ldm = fake_ldm_unet(arch, diffusers_base)
    targets = TARGETS[arch] + (RES if res else ())  # RES in diffusers names; add_lora finds the LDM twins
    cfg = LoraConfig(rank=4, alpha=8.0, target_modules=targets)
    randomise(add_lora(ldm, cfg), seed=11)
    path = save_lora(tmp_path / "ldm.safetensors", ldm, cfg, arch=arch)
    lora = load_lora(path)
    paths = ldm_to_diffusers_paths(arch, COMFY_TINY[arch])
    trained = [n for n, m in ldm.named_modules() if n in paths and hasattr(m, "lora_A")]
    expected_suffixes = TARGETS[arch] + (tuple(RESNET_LAYERS) if res else ())
    assert trained and all(n.endswith(expected_suffixes) for n in trained)
    assert res == any(n.endswith(".in_layers.2") for n in trained)
    own = {kohya_name(p) for p in trained}
    names = {k.split(".")[0] for k in lora.state}
    assert names == (own if arch == "sdxl" else {kohya_name(paths[p]) for p in trained})
    fresh = copy.deepcopy(diffusers_base)
    apply_lora_file(fresh, lora)
    assert_same_modules(ldm, fresh, arch, trained)
    plain = save_lora(tmp_path / "plain.safetensors", ldm, cfg)  # no arch: the module's own names
    assert {k.split(".")[0] for k in load_lora(plain).state} == own


# ---- metadata and conversions ----------------------------------------------------------------------

def test_metadata_for_each_arch(tmp_path):
    tuned, cfg = tuned_unet("sd15")
    path = save_lora(tmp_path / "m.safetensors", tuned, cfg, arch="sd15",
                     metadata={"alignprop.steps": "3", "modelspec.title": "cats"})
    meta = load_lora(path).metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"] == "diffusers"
    assert (meta["modelspec.title"], meta["alignprop.steps"]) == ("cats", "3")

    xl = lora_metadata("sdxl", 8, 16.0, {"modelspec.author": "me"})
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (xl["ss_network_dim"], xl["ss_network_alpha"], xl["modelspec.author"]) == ("8", "16.0", "me")
    assert all(isinstance(v, str) for v in xl.values())
    with pytest.raises(ValueError, match="ss_network_dim"):
        lora_metadata("sdxl", 8, 16.0, {"ss_network_dim": "4"})


def test_convert_names_both_forms_and_back():
    kohya = {f"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.{s}": i
             for i, s in enumerate(("lora_down.weight", "lora_up.weight", "alpha"))}
    sdxl, sd15 = unet_layout(arch="sdxl"), unet_layout(arch="sd15")
    diffusers = convert_names(kohya, "ldm", "diffusers", sdxl)
    assert diffusers == {f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.{s}": i
                         for i, s in enumerate(("lora_down.weight", "lora_up.weight", "alpha"))}
    assert CANONICAL_NAMING == {"sd15": "diffusers", "sdxl": "ldm"}  # SDXL files use LDM names
    assert convert_names(diffusers, "diffusers", "ldm", sdxl) == kohya
    peft = {"output_blocks.3.1.transformer_blocks.0.attn1.to_k.lora_A.weight": 1}
    assert convert_names(peft, "ldm", "diffusers", sd15) == {
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight": 1}
    assert convert_names(kohya, "ldm", "ldm", None) == kohya


def test_bad_inputs_raise_actionable_errors(tmp_path):
    conv_in = {"lora_unet_input_blocks_0_0.lora_down.weight": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="no diffusers counterpart.*lora_unet_input_blocks_0_0"):
        convert_names(conv_in, "ldm", "diffusers", unet_layout(arch="sd15"))
    with pytest.raises(ValueError, match="Unknown arch 'sd3'; use one of sd15, sdxl"):
        unet_layout(arch="sd3")
    with pytest.raises(ValueError, match="Unknown naming 'sgm'"):
        convert_names(conv_in, "sgm", "ldm", None)
    with pytest.raises(ValueError, match="mix LDM"):
        naming_of(["input_blocks.1.1", "down_blocks.0"])
    with pytest.raises(ValueError, match="'AttnDownBlock2D' is not supported"):
        unet_layout({"down_block_types": ["AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D"]})
    with pytest.raises(ValueError, match="transformer_depth"):
        unet_layout({**COMFY_FULL["sd15"], "transformer_depth": [1]})
    with pytest.raises(ValueError, match="Cannot read a UNet layout"):
        unet_layout({"channels": 4})

    holder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cfg = LoraConfig(target_modules=("0",))
    add_lora(holder, cfg)
    with pytest.raises(ValueError, match="need a UNet"):
        save_lora(tmp_path / "x.safetensors", holder, cfg, arch="sd15")
    with pytest.raises(ValueError, match="Unknown arch 'sd4'; use one of sd15, sdxl, sd3, flux"):
        save_lora(tmp_path / "x.safetensors", holder, cfg, arch="sd4")
    with pytest.raises(ValueError, match="arch='sd3' but the module is not an SD3 or FLUX transformer"):
        save_lora(tmp_path / "x.safetensors", holder, cfg, arch="sd3")
    with pytest.raises(ValueError, match="Unknown naming"):
        save_lora(tmp_path / "x.safetensors", holder, cfg, naming="kohya")
    assert not list(tmp_path.iterdir())
