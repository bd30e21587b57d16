"""Model families of LoRAs: which family a model or a LoRA file belongs to, the refusal to apply a
LoRA across families, and the default target modules per family.

Families (``arch``): ``sd15`` (SD1.x/2.x UNets), ``sdxl``, ``sd3`` (SD3/SD3.5 MMDiT), ``flux``
(FLUX.1) and ``zimage`` (Z-Image, ComfyUI's NextDiT names only). A file says its family in its
metadata (``modelspec.architecture``, else kohya's
``ss_base_model_version``); without metadata its module names tell the UNet families from SD3 and
FLUX, and often SD3 from FLUX. A model's family is read off its module names, in diffusers or
ComfyUI naming.

SD1.x and SDXL LoRAs name the same kind of UNet modules; what tells them apart is the layer sizes,
which ``check`` compares shape for shape. Across UNet, SD3 and FLUX the names themselves differ, so
a LoRA of one applied to another fails with missing modules at best: ``check_family`` says which
families met instead, before anything is injected.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from torch import nn

from ..config import LoraConfig
from .keys import LORA_ARCHS, check_lora_arch
from .transformer_keys import FACTOR_SUFFIXES, TRANSFORMER_PREFIX
from .unet_paths import naming_of

UNET_ARCHS = ("sd15", "sdxl")
# The attention projections of both streams of an SD3/FLUX joint block; in FLUX's single blocks
# to_q/to_k/to_v match too (they have no output projection: proj_out also takes the MLP branch).
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_TARGETS = {"sd15": LoraConfig().target_modules, "sdxl": LoraConfig().target_modules,
                   "sd3": JOINT_ATTENTION, "flux": JOINT_ATTENTION, "zimage": ("attention.qkv", "attention.out")}
# The layers of the original (ComfyUI) SD3/FLUX module names that hold the diffusers targets: q, k and
# v are one fused ``qkv`` per stream, so targeting any of them targets it; FLUX's single blocks fuse
# q, k, v and the MLP input in ``linear1``.
NATIVE_TWINS = {
    "sd3": {"to_q": ("x_block.attn.qkv",), "to_k": ("x_block.attn.qkv",), "to_v": ("x_block.attn.qkv",),
            "to_out.0": ("x_block.attn.proj",), "add_q_proj": ("context_block.attn.qkv",),
            "add_k_proj": ("context_block.attn.qkv",), "add_v_proj": ("context_block.attn.qkv",),
            "to_add_out": ("context_block.attn.proj",)},
    # Z-Image (ComfyUI's NextDiT): one fused qkv and an output projection per attention layer
    "zimage": {"to_q": ("attention.qkv",), "to_k": ("attention.qkv",), "to_v": ("attention.qkv",),
               "to_out.0": ("attention.out",)},
    "flux": {"to_q": ("img_attn.qkv", "linear1"), "to_k": ("img_attn.qkv", "linear1"),
             "to_v": ("img_attn.qkv", "linear1"), "to_out.0": ("img_attn.proj",),
             "add_q_proj": ("txt_attn.qkv",), "add_k_proj": ("txt_attn.qkv",), "add_v_proj": ("txt_attn.qkv",),
             "to_add_out": ("txt_attn.proj",)},
}
# modelspec.architecture prefixes (kohya sd-scripts / SAI model spec) and ss_base_model_version prefixes
_ARCHITECTURES = (("stable-diffusion-v1", "sd15"), ("stable-diffusion-v2", "sd15"),
                  ("stable-diffusion-xl", "sdxl"), ("stable-diffusion-3", "sd3"), ("flux-1", "flux"),
                  ("z-image", "zimage"))
_BASE_VERSIONS = (("sd_v1", "sd15"), ("sd_v2", "sd15"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux1", "flux"),
                  ("z_image", "zimage"))


def lora_preset(cfg: LoraConfig, arch: str) -> LoraConfig:
    """``cfg`` with the default target modules of ``arch`` (rank, alpha and seed kept).

    SD1.x/SDXL: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``. SD3/FLUX: the
    same plus the text stream's ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``
    (``JOINT_ATTENTION``). FLUX's single blocks also have ``proj_mlp`` and ``proj_out``; give them
    by full path if wanted (the suffix ``proj_out`` also names the model's final output layer).

    Args:
        cfg: the LoRA config to start from.
        arch: ``sd15``, ``sdxl``, ``sd3`` or ``flux``.

    Returns:
        A new ``LoraConfig``.
    """
    return dataclasses.replace(cfg, target_modules=DEFAULT_TARGETS[check_lora_arch(arch)])


def native_targets(targets: Iterable[str], arch: str) -> tuple[str, ...]:
    """``targets`` plus the native (ComfyUI) twins of its diffusers names on an SD3/FLUX model.

    A diffusers target such as ``to_q`` names no layer of a model with the original module names;
    its twin (``x_block.attn.qkv``, ``img_attn.qkv`` ...) does, so one target list works on both
    namings. Names without a twin (native paths given directly) are kept as they are.

    Args:
        targets: target-module suffixes, diffusers or native.
        arch: ``sd3`` or ``flux`` (other families are returned unchanged).
    """
    targets = tuple(targets)
    twins = NATIVE_TWINS.get(arch, {})
    extra = [twin for t in targets for twin in twins.get(t, ())]
    return targets + tuple(dict.fromkeys(t for t in extra if t not in targets))


def model_arch(module: nn.Module) -> str | None:
    """The family of a denoiser from its module names, or None when it is none of them.

    Reads diffusers names (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
    ``UNet2DConditionModel``) and ComfyUI's (``joint_blocks``, ``double_blocks``, ``input_blocks``).
    A UNet with an SDXL-style added embedding (``add_embedding``, ComfyUI ``label_emb``) is ``sdxl``,
    any other ``sd15``.
    """
    names = {name for name, _ in module.named_modules() if name}
    if "cap_embedder" in names and "layers.0.attention.qkv" in names:  # ComfyUI's NextDiT
        return "zimage"
    joint = "transformer_blocks.0.attn.add_q_proj" in names
    if ("double_blocks.0.img_attn" in names or "single_transformer_blocks.0.attn" in names
            or (joint and "x_embedder" in names)):
        return "flux"
    if "joint_blocks.0.x_block" in names or (joint and "pos_embed" in names):
        return "sd3"
    try:
        naming = naming_of(names)
    except ValueError:  # names of both UNet namings: none of these models
        return None
    if naming is None:
        return None
    return "sdxl" if {"add_embedding", "label_emb"} & names else "sd15"


def is_diffusers_transformer(module: nn.Module) -> bool:
    """Whether ``module`` has diffusers transformer names (``transformer_blocks``), not ComfyUI's."""
    return any(name.startswith("transformer_blocks.") for name, _ in module.named_modules())


def metadata_arch(metadata: Mapping[str, str]) -> str | None:
    """The family a file's metadata names (``modelspec.architecture``, else ``ss_base_model_version``),
    or None when it names none of them (or nothing)."""
    for key, table in (("modelspec.architecture", _ARCHITECTURES), ("ss_base_model_version", _BASE_VERSIONS)):
        value = str(metadata.get(key, "")).strip().lower()
        if value:
            return next((arch for prefix, arch in table if value.startswith(prefix)), None)
    return None


def _name_archs(name: str) -> set[str]:
    """The families a file's module name can belong to (all of them when it says nothing)."""
    if name.startswith(TRANSFORMER_PREFIX + "."):
        path = name[len(TRANSFORMER_PREFIX) + 1:]
        if path.startswith(("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder")):
            return {"flux"}
        if path.startswith("pos_embed") or ".attn2." in path:  # SD3's patch embedding, SD3.5's attn2
            return {"sd3"}
        return {"sd3", "flux"}
    if name.startswith("lora_unet_"):
        path = name[len("lora_unet_"):]
        if path.startswith(("double_blocks_", "single_blocks_")):  # FLUX in BFL naming
            return {"flux"}
        if path.startswith("joint_blocks_"):  # SD3 in SAI naming
            return {"sd3"}
        if path.startswith(("layers_", "context_refiner_", "noise_refiner_", "cap_embedder_")):  # Z-Image
            return {"zimage"}
        if naming_of([name]) is not None:
            return set(UNET_ARCHS)
    return set(LORA_ARCHS)


def file_archs(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> tuple[tuple[str, ...], str]:
    """The families a LoRA file can be for, and where that was read.

    Args:
        keys: the file's tensor keys.
        metadata: its safetensors metadata.

    Returns:
        ``((arch, ...), "metadata" | "key names")``; ``((), "")`` when neither tells.
    """
    arch = metadata_arch(metadata or {})
    if arch is not None:
        return (arch,), "metadata"
    possible = set(LORA_ARCHS)
    for key in keys:
        suffix = next((s for s in (*FACTOR_SUFFIXES, "alpha") if key.endswith("." + s)), None)
        possible &= _name_archs(key[: -len(suffix) - 1] if suffix else key)
    if not possible or possible == set(LORA_ARCHS):
        return (), ""
    return tuple(a for a in LORA_ARCHS if a in possible), "key names"


def _kind(arch: str) -> str:
    return "unet" if arch in UNET_ARCHS else arch


def check_family(keys: Iterable[str], metadata: Mapping[str, str] | None, module: nn.Module) -> None:
    """ValueError, naming both families, if a LoRA file is for another model family than ``module``.

    SD1.x and SDXL count as one family here (their layer sizes are checked by ``check``). Nothing
    is checked when the model's or the file's family cannot be told.

    Args:
        keys: the file's tensor keys.
        metadata: its safetensors metadata.
        module: the model it is meant for (diffusers or ComfyUI naming).
    """
    have = model_arch(module)
    archs, source = file_archs(keys, metadata)
    if have is None or not archs or _kind(have) in {_kind(a) for a in archs}:
        return
    trained = " or ".join(archs)
    raise ValueError(f"This LoRA was trained for {trained} (so says its {source}); the model is {have}: "
                     f"give a LoRA trained on {have}, or none.")
