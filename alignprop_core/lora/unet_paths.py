"""UNet module paths in the two namings, and the block layout that maps one onto the other.

A UNet's modules come in two namings of the same network:

* ``diffusers`` (``UNet2DConditionModel``): ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
* ``ldm`` (ComfyUI/sgm ``UNetModel``): ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``

The correspondence follows the block layout (``UNetLayout``): LDM numbers input blocks
consecutively (conv_in, then per level its res blocks and one downsampler), the middle block is
``[res, transformer, res]``, and output blocks run from the deepest level up with one extra block
per level; diffusers numbers blocks per level. The layout is read off a diffusers config, a ComfyUI
``unet_config`` or the module names of either UNet. LoRA key forms and file conventions are in
``keys``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

ARCHS = ("sd15", "sdxl")
NAMINGS = ("ldm", "diffusers")
_FULL_CONFIGS = {
    "sd15": {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             "layers_per_block": 2, "transformer_layers_per_block": 1},
    "sdxl": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10)},
}
_LINEARS_PER_BLOCK = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                           for proj in ("to_q", "to_k", "to_v", "to_out.0")) + ("ff.net.0.proj", "ff.net.2")
# Res-block layers that can carry LoRA: LDM name -> diffusers name (ComfyUI's UNET_MAP_RESNET pairs).
# LDM res blocks always have a skip_connection (an Identity where the channels stay the same);
# diffusers ones have a conv_shortcut only where they change.
RESNET_LAYERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut"}


def check_arch(arch: str | None) -> str:
    """``arch`` itself if it is ``sd15`` or ``sdxl``; otherwise a ValueError listing both."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; use one of {', '.join(ARCHS)}.")
    return arch


def check_naming(naming: str | None) -> str:
    """``naming`` itself if it is ``ldm`` or ``diffusers``; otherwise a ValueError listing both."""
    if naming not in NAMINGS:
        raise ValueError(f"Unknown naming {naming!r}; use one of {', '.join(NAMINGS)}.")
    return naming


def naming_of(names: Iterable[str]) -> str | None:
    """``ldm``, ``diffusers`` or None (neither) for module paths or kohya names of a UNet."""
    found = set()
    for name in names:
        name = name[len("lora_unet_"):] if name.startswith("lora_unet_") else name
        if re.match(r"(input_blocks|middle_block|output_blocks)[._]", name):
            found.add("ldm")
        elif re.match(r"(down_blocks|mid_block|up_blocks)[._]", name):
            found.add("diffusers")
    if len(found) > 1:
        raise ValueError("The names mix LDM (input_blocks...) and diffusers (down_blocks...) UNet naming; "
                         "a LoRA must use one of them.")
    return found.pop() if found else None


@dataclass(frozen=True)
class UNetLayout:
    """Where the transformers sit; levels counted from full resolution (level 0) down."""

    down: tuple[tuple[int, ...], ...]  # per level, transformer depth after each res block (0 = none)
    up: tuple[tuple[int, ...], ...]  # per level, depth in each of its up blocks (res blocks + 1)
    mid: int  # transformer depth of the middle block (0 = none)


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _per_layer(value: Any, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _block_depths(kind: str, depth: Any, count: int) -> tuple[int, ...]:
    """Transformer depth per layer of one diffusers block."""
    if kind in ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"):
        return tuple(_per_layer(depth, count))
    if kind in ("DownBlock2D", "UpBlock2D"):
        return (0,) * count
    raise ValueError(f"UNet block type {kind!r} is not supported for LoRA key conversion; only the SD1.x/"
                     "SDXL blocks (CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D, UpBlock2D) are.")


def _layout_from_diffusers(cfg: Any) -> UNetLayout:
    down_types, up_types = list(_field(cfg, "down_block_types")), list(_field(cfg, "up_block_types"))
    n = len(down_types)
    layers = _per_layer(_field(cfg, "layers_per_block", 2), n)
    depth = _field(cfg, "transformer_layers_per_block", 1)
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    up_depth = _field(cfg, "reverse_transformer_layers_per_block") or list(reversed(depth))
    mid_type = _field(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
        raise ValueError(f"UNet mid_block_type {mid_type!r} is not supported for LoRA key conversion.")
    down = tuple(_block_depths(kind, depth[i], layers[i]) for i, kind in enumerate(down_types))
    # up block u serves level n-1-u and has one layer more than that level's down block
    up = tuple(_block_depths(up_types[n - 1 - lv], up_depth[n - 1 - lv], layers[lv] + 1) for lv in range(n))
    mid = _per_layer(depth[-1], 1)[0] if mid_type == "UNetMidBlock2DCrossAttn" else 0
    return UNetLayout(down=down, up=up, mid=mid)


def _layout_from_comfy(cfg: Any) -> UNetLayout:
    levels = len(_field(cfg, "channel_mult"))
    res = _per_layer(_field(cfg, "num_res_blocks"), levels)
    depth_in = list(_field(cfg, "transformer_depth"))
    depth_out = list(_field(cfg, "transformer_depth_output"))
    if len(depth_in) != sum(res) or len(depth_out) != sum(res) + levels:
        raise ValueError(f"unet_config has {len(depth_in)} transformer_depth and {len(depth_out)} "
                         f"transformer_depth_output entries but num_res_blocks {res} needs {sum(res)} and "
                         f"{sum(res) + levels}; pass the model's own unet_config.")
    down, up = [], []
    for r in res:
        down.append(tuple(depth_in[:r]))
        del depth_in[:r]
        up.append(tuple(reversed(depth_out[: r + 1])))  # listed deepest-last; built deepest-first
        del depth_out[: r + 1]
    mid = int(_field(cfg, "transformer_depth_middle", 0))  # -1: no middle transformer, -2: no middle block
    return UNetLayout(down=tuple(down), up=tuple(up), mid=max(mid, 0))


def _count(names: set[str], pattern: str) -> dict[tuple[int, ...], int]:
    """Module names matching ``pattern``: leading groups -> 1 + the largest value of the last group."""
    found: dict[tuple[int, ...], int] = {}
    for name in names:
        m = re.fullmatch(pattern, name)
        if m:
            *head, last = (int(g) for g in m.groups())
            found[tuple(head)] = max(found.get(tuple(head), 0), last + 1)
    return found


def _layout_from_diffusers_modules(names: set[str]) -> UNetLayout:
    res = _count(names, r"down_blocks\.(\d+)\.resnets\.(\d+)")
    ups = _count(names, r"up_blocks\.(\d+)\.resnets\.(\d+)")
    d_in = _count(names, r"down_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)")
    d_out = _count(names, r"up_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)")
    n = len(res)
    down = tuple(tuple(d_in.get((lv, i), 0) for i in range(res[(lv,)])) for lv in range(n))
    up = tuple(tuple(d_out.get((n - 1 - lv, i), 0) for i in range(ups[(n - 1 - lv,)])) for lv in range(n))
    mid = _count(names, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)").get((), 0)
    return UNetLayout(down=down, up=up, mid=mid)


def _layout_from_ldm_modules(names: set[str]) -> UNetLayout:
    last = max(j for (j,) in _count(names, r"input_blocks\.(\d+)\.(\d+)"))
    depth_in = _count(names, r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)")
    depth_out = _count(names, r"output_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)")
    levels: list[list[int]] = [[]]
    for j in range(1, last + 1):  # input_blocks.0 is conv_in
        if f"input_blocks.{j}.0.op" in names:  # a downsampler closes the level
            levels.append([])
        else:
            levels[-1].append(depth_in.get((j,), 0))
    if not levels[-1]:  # a downsampler after the last level (not in real UNets, but in some key maps)
        levels.pop()
    up: list[tuple[int, ...]] = [()] * len(levels)
    n = 0
    for level in reversed(range(len(levels))):
        up[level] = tuple(depth_out.get((n + i,), 0) for i in range(len(levels[level]) + 1))
        n += len(levels[level]) + 1
    mid = _count(names, r"middle_block\.1\.transformer_blocks\.(\d+)").get((), 0)
    return UNetLayout(down=tuple(tuple(lv) for lv in levels), up=tuple(up), mid=mid)


def unet_layout(unet_config: Any = None, arch: str | None = None) -> UNetLayout:
    """The transformer layout of a UNet, from whatever describes it.

    Args:
        unet_config: a diffusers UNet config (mapping or object with ``down_block_types``), a ComfyUI
            ``unet_config`` dict (``num_res_blocks``, ``channel_mult``, ``transformer_depth``,
            ``transformer_depth_output``, ``transformer_depth_middle``), a UNet module of either
            naming (read off its module names), a ``UNetLayout``, or None for the full ``arch`` model.
        arch: ``sd15`` or ``sdxl``; only used when ``unet_config`` is None.

    Returns:
        A ``UNetLayout``.
    """
    if isinstance(unet_config, UNetLayout):
        return unet_config
    if isinstance(unet_config, nn.Module):
        names = {n for n, _ in unet_config.named_modules()}
        naming = naming_of(names)
        if naming is None:
            raise ValueError("The module has neither diffusers (down_blocks) nor LDM (input_blocks) UNet "
                             "module names; pass the UNet itself (e.g. model.model.diffusion_model).")
        return (_layout_from_diffusers_modules if naming == "diffusers" else _layout_from_ldm_modules)(names)
    if unet_config is None:
        return _layout_from_diffusers(_FULL_CONFIGS[check_arch(arch)])
    if _field(unet_config, "num_res_blocks") is not None and _field(unet_config, "channel_mult") is not None:
        return _layout_from_comfy(unet_config)
    if _field(unet_config, "down_block_types") is not None:
        return _layout_from_diffusers(unet_config)
    raise ValueError(f"Cannot read a UNet layout from {type(unet_config).__name__}; give a diffusers config "
                     "(down_block_types, ...) or a ComfyUI unet_config (num_res_blocks, channel_mult, ...).")


def _level_blocks(layout: UNetLayout) -> Iterator[tuple[str, str, int, int]]:
    """(LDM block, diffusers block, layer index, transformer depth) of every res block (with its
    transformer, if any) of the down and up levels, in LDM build order; the middle block is not here."""
    n = 1  # input_blocks.0 is conv_in
    for level, depths in enumerate(layout.down):
        for i, depth in enumerate(depths):
            yield f"input_blocks.{n}", f"down_blocks.{level}", i, depth
            n += 1
        n += 1  # the downsampler block (after the last level nothing follows, so harmless)
    n = 0
    for u, depths in enumerate(reversed(layout.up)):
        for i, depth in enumerate(depths):
            yield f"output_blocks.{n}", f"up_blocks.{u}", i, depth
            n += 1


def _transformers(layout: UNetLayout) -> Iterator[tuple[str, str, int]]:
    """(LDM prefix, diffusers prefix, depth) of every transformer."""
    for ldm, diffusers, i, depth in _level_blocks(layout):
        if depth:
            yield f"{ldm}.1", f"{diffusers}.attentions.{i}", depth
    if layout.mid:
        yield "middle_block.1", "mid_block.attentions.0", layout.mid


def _resnets(layout: UNetLayout) -> Iterator[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) of every res block."""
    for ldm, diffusers, i, _ in _level_blocks(layout):
        yield f"{ldm}.0", f"{diffusers}.resnets.{i}"
    if layout.mid:  # [res, transformer, res]; a middle block without a transformer is not mapped
        yield "middle_block.0", "mid_block.resnets.0"
        yield "middle_block.2", "mid_block.resnets.1"


def ldm_to_diffusers_paths(arch: str, unet_config: Any = None) -> dict[str, str]:
    """LDM module path -> diffusers module path for every LoRA-able layer of the UNet's blocks.

    Covers ``proj_in``, ``proj_out`` and, per transformer block, ``attn1``/``attn2`` ``to_q``, ``to_k``,
    ``to_v``, ``to_out.0`` and ``ff.net.0.proj``, ``ff.net.2``; and per res block ``conv1``,
    ``conv2``, ``time_emb_proj`` and ``conv_shortcut`` (``RESNET_LAYERS``). Not mapped: conv_in/out,
    the time embedding, down/upsamplers and norms.

    Args:
        arch: ``sd15`` or ``sdxl``.
        unet_config: the UNet's structure (see ``unet_layout``); None means the full ``arch`` model.

    Returns:
        e.g. ``{"input_blocks.1.1.transformer_blocks.0.attn1.to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ...}``.
    """
    return layout_path_pairs(unet_layout(unet_config, check_arch(arch)))


def layout_path_pairs(layout: UNetLayout) -> dict[str, str]:
    """LDM module path -> diffusers module path of every LoRA-able layer of ``layout``
    (see ``ldm_to_diffusers_paths``)."""
    out: dict[str, str] = {}
    for ldm, diffusers, depth in _transformers(layout):
        suffixes = ["proj_in", "proj_out"] + [f"transformer_blocks.{t}.{s}" for t in range(depth)
                                              for s in _LINEARS_PER_BLOCK]
        out.update({f"{ldm}.{s}": f"{diffusers}.{s}" for s in suffixes})
    for ldm, diffusers in _resnets(layout):
        out.update({f"{ldm}.{a}": f"{diffusers}.{b}" for a, b in RESNET_LAYERS.items()})
    return out
