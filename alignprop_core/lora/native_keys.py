"""SD3 / FLUX.1 LoRA files of the original (ComfyUI) module names rewritten in the diffusers
transformer form, exactly, so diffusers' ``load_lora_weights`` reads a LoRA trained in ComfyUI.

ComfyUI's models fuse layers that diffusers keeps apart: one ``qkv`` per stream (diffusers' to_q,
to_k, to_v or add_q/k/v_proj) and FLUX's ``single_blocks.N.linear1`` (to_q, to_k, to_v and
proj_mlp of the single block). A LoRA on a fused layer, delta = s B A with B (out, r), is the same
update as LoRAs on its parts that share A and take B's rows in output order: q, k, v in equal
thirds (linear1: hidden, hidden, hidden, then the MLP rows; hidden is A's input width). Every other
layer maps one to one. Modulation, embedding and final layers are refused: diffusers orders some of
their outputs differently, and no test here checks them.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from .families import file_archs
from .file import LoraFile
from .keys import KOHYA_SUFFIXES
from .transformer_keys import TRANSFORMER_PREFIX, key_form

# kohya module name (after lora_unet_) -> diffusers module paths, one per row block of the fused layer
_SD3 = (
    (r"joint_blocks_(\d+)_x_block_attn_qkv", "transformer_blocks.{}.attn.", ("to_q", "to_k", "to_v")),
    (r"joint_blocks_(\d+)_x_block_attn_proj", "transformer_blocks.{}.attn.", ("to_out.0",)),
    (r"joint_blocks_(\d+)_x_block_attn2_qkv", "transformer_blocks.{}.attn2.", ("to_q", "to_k", "to_v")),
    (r"joint_blocks_(\d+)_x_block_attn2_proj", "transformer_blocks.{}.attn2.", ("to_out.0",)),
    (r"joint_blocks_(\d+)_context_block_attn_qkv", "transformer_blocks.{}.attn.",
     ("add_q_proj", "add_k_proj", "add_v_proj")),
    (r"joint_blocks_(\d+)_context_block_attn_proj", "transformer_blocks.{}.attn.", ("to_add_out",)),
    (r"joint_blocks_(\d+)_x_block_mlp_fc1", "transformer_blocks.{}.ff.", ("net.0.proj",)),
    (r"joint_blocks_(\d+)_x_block_mlp_fc2", "transformer_blocks.{}.ff.", ("net.2",)),
    (r"joint_blocks_(\d+)_context_block_mlp_fc1", "transformer_blocks.{}.ff_context.", ("net.0.proj",)),
    (r"joint_blocks_(\d+)_context_block_mlp_fc2", "transformer_blocks.{}.ff_context.", ("net.2",)),
)
_FLUX = (
    (r"double_blocks_(\d+)_img_attn_qkv", "transformer_blocks.{}.attn.", ("to_q", "to_k", "to_v")),
    (r"double_blocks_(\d+)_img_attn_proj", "transformer_blocks.{}.attn.", ("to_out.0",)),
    (r"double_blocks_(\d+)_txt_attn_qkv", "transformer_blocks.{}.attn.", ("add_q_proj", "add_k_proj", "add_v_proj")),
    (r"double_blocks_(\d+)_txt_attn_proj", "transformer_blocks.{}.attn.", ("to_add_out",)),
    (r"double_blocks_(\d+)_img_mlp_0", "transformer_blocks.{}.ff.", ("net.0.proj",)),
    (r"double_blocks_(\d+)_img_mlp_2", "transformer_blocks.{}.ff.", ("net.2",)),
    (r"double_blocks_(\d+)_txt_mlp_0", "transformer_blocks.{}.ff_context.", ("net.0.proj",)),
    (r"double_blocks_(\d+)_txt_mlp_2", "transformer_blocks.{}.ff_context.", ("net.2",)),
    (r"single_blocks_(\d+)_linear1", "single_transformer_blocks.{}.", ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                      "proj_mlp")),
    (r"single_blocks_(\d+)_linear2", "single_transformer_blocks.{}.", ("proj_out",)),
)
LAYERS = {"sd3": _SD3, "flux": _FLUX}
_DOWN, _UP, _ALPHA = KOHYA_SUFFIXES


def _row_blocks(rows: int, parts: int, hidden: int) -> list[int]:
    """How B's rows split over the parts: one block, q/k/v thirds, or (linear1) q, k, v of the
    input width and the MLP rows after them."""
    if parts == 1:
        return [rows]
    if parts == 3:
        if rows % 3:
            raise ValueError(f"a fused qkv LoRA has {rows} output rows, not a multiple of 3")
        return [rows // 3] * 3
    if rows <= 3 * hidden:
        raise ValueError(f"a linear1 LoRA has {rows} output rows, not more than q, k and v ({3 * hidden})")
    return [hidden] * 3 + [rows - 3 * hidden]


def native_to_diffusers(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The diffusers transformer form of a kohya LoRA state of ComfyUI's SD3 or FLUX.1 layers.

    Args:
        state: ``lora_unet_<native path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` keys.
        arch: ``sd3`` or ``flux``.

    Returns:
        ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` (and ``.alpha`` where the
        file had one): each fused layer becomes its parts with the same lora_A and alpha.

    Raises:
        ValueError: another arch, or a layer without a diffusers twin here (named, with the layers
            that convert).
    """
    if arch not in LAYERS:
        raise ValueError(f"arch={arch!r}: only sd3 and flux LoRAs of ComfyUI's layers convert to diffusers keys.")
    modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith("." + _DOWN)})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for module in modules:
        name = module.removeprefix("lora_unet_")
        match = next(((m, prefix, parts) for pattern, prefix, parts in LAYERS[arch]
                      if (m := re.fullmatch(pattern, name))), None)
        if match is None:
            unknown.append(module)
            continue
        m, prefix, parts = match
        down, up = state[f"{module}.{_DOWN}"], state[f"{module}.{_UP}"]
        blocks = _row_blocks(up.shape[0], len(parts), down.shape[1])
        for part, rows in zip(parts, torch.split(up, blocks, dim=0)):
            path = f"{TRANSFORMER_PREFIX}.{prefix.format(m.group(1))}{part}"
            out[f"{path}.lora_A.weight"] = down.clone()
            out[f"{path}.lora_B.weight"] = rows.clone()
            if f"{module}.{_ALPHA}" in state:
                out[f"{path}.alpha"] = state[f"{module}.{_ALPHA}"].clone()
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise ValueError(f"{len(unknown)} LoRA layer(s) have no diffusers twin here ({shown}); the layers that "
                         "convert are the attention (qkv, proj), MLP and, for FLUX, single-block linear1/linear2 "
                         "layers. Keep the kohya file for ComfyUI and Forge, or train without those layers.")
    return out


def diffusers_lora_file(lora: LoraFile, arch: str | None = None) -> tuple[LoraFile, str]:
    """``lora`` (an SD3/FLUX.1 ``LoraFile``) in the diffusers transformer form, and its family.

    A file already in that form comes back as it is; one of ComfyUI's layers (kohya keys) is
    converted (``native_to_diffusers``). Rank, alpha and metadata are kept, except the naming of the
    keys (``modelspec.implementation``), which ``save_lora_file`` sets anew; write the result with
    ``save_lora_file(path, lora, arch=arch)`` (for SD3 it folds alpha into lora_B, as diffusers reads it).

    Args:
        lora: the LoRA.
        arch: ``sd3`` or ``flux``; None reads it from the metadata, else from the key names.

    Raises:
        ValueError: a LoRA of another family (SD1.x/SDXL files are read by diffusers as they are),
            one whose family cannot be told, or a layer without a diffusers twin.
    """
    if arch is None:
        archs, _ = file_archs(lora.state, lora.metadata)
        flows = [a for a in archs if a in LAYERS]
        if archs and not flows:
            arch = " or ".join(archs)
        elif len(flows) != 1:
            raise ValueError("cannot tell whether this LoRA is for SD3 or FLUX.1 (its metadata names no family); "
                             "give arch='sd3' or 'flux'.")
        else:
            arch = flows[0]
    if arch not in LAYERS:
        raise ValueError(f"this LoRA is for {arch}; the diffusers key format applies to SD3 and FLUX.1 LoRAs "
                         "(SD1.x/SDXL LoRA files are read by diffusers as they are).")
    if key_form(lora.state) == "diffusers":
        return lora, arch
    metadata = {k: v for k, v in lora.metadata.items() if k != "modelspec.implementation"}
    return dataclasses.replace(lora, state=native_to_diffusers(lora.state, arch), metadata=metadata), arch
