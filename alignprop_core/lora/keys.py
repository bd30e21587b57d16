"""LoRA key forms and file conventions: peft <-> kohya keys, which module naming a file uses, and the
safetensors metadata.

UNet files (SD1.x, SDXL) use the kohya form (one module, peft form left, kohya form right)::

    <module path>.lora_A.weight  (r, in)   <->  lora_unet_<module path, '.' -> '_'>.lora_down.weight
    <module path>.lora_B.weight  (out, r)  <->  lora_unet_<module path, '.' -> '_'>.lora_up.weight
                                                lora_unet_<...>.alpha  0-dim; update = up @ down * alpha / r

Replacing '.' by '_' loses information (``transformer_blocks`` vs ``transformer.blocks``), so
``kohya_to_peft`` never guesses the path from the string: it looks the name up among the real
module names of the target module.

Files use the naming each ecosystem expects (kohya sd-scripts conventions, read by A1111/Forge,
ComfyUI and diffusers alike): SD1.x files use diffusers names, SDXL files use LDM names
(``CANONICAL_NAMING``); ``convert_names`` renames a state between the two with the UNet path map
of ``unet_paths``.

SD3 and FLUX.1 files of a diffusers transformer use the diffusers form instead (``transformer_keys``);
those of the models' original (``native``) module names, which ComfyUI's models have
(``joint_blocks``, ``double_blocks``/``single_blocks``), use the kohya form above, as kohya
sd-scripts writes FLUX files.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .unet_paths import check_naming, layout_path_pairs, naming_of, unet_layout

LORA_ARCHS = ("sd15", "sdxl", "sd3", "flux", "zimage")  # model families a LoRA file can be written for
TRANSFORMER_ARCHS = ("sd3", "flux")  # families whose files may use the diffusers transformer form
NATIVE_ARCHS = (*TRANSFORMER_ARCHS, "zimage")  # transformers whose files may use their original module names
# SD3/FLUX module namings: diffusers' transformer, or the original one (SAI's MMDiT, BFL's Flux) that
# ComfyUI's models have
TRANSFORMER_NAMINGS = ("diffusers", "native")
CANONICAL_NAMING = {"sd15": "diffusers", "sdxl": "ldm"}  # what kohya sd-scripts writes per UNet arch
PEFT_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
NETWORK_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha")
ARCH_METADATA = {  # ss_base_model_version, modelspec.architecture, modelspec.resolution
    "sd15": ("sd_v1", "stable-diffusion-v1/lora", "512x512"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024"),
    "sd3": ("sd3", "stable-diffusion-3-medium/lora", "1024x1024"),
    "flux": ("flux1", "flux-1-dev/lora", "1024x1024"),
    "zimage": ("z_image", "z-image/lora", "1024x1024"),  # no established value yet: ours, named plainly
}


def check_lora_arch(arch: str | None) -> str:
    """``arch`` itself if a LoRA file can be written for it; otherwise a ValueError listing them."""
    if arch not in LORA_ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; use one of {', '.join(LORA_ARCHS)}.")
    return arch
# modelspec.implementation names the code whose module names the file uses.
_IMPLEMENTATION = {"ldm": "https://github.com/Stability-AI/generative-models", "diffusers": "diffusers"}
_NATIVE_IMPLEMENTATION = {"sd3": "https://github.com/Stability-AI/sd3.5",
                          "flux": "https://github.com/black-forest-labs/flux",
                          "zimage": "https://github.com/Tongyi-MAI/Z-Image"}


def _implementation(arch: str, naming: str | None) -> str:
    """``modelspec.implementation`` of an ``arch`` file whose keys use ``naming``."""
    if arch not in NATIVE_ARCHS:
        return _IMPLEMENTATION[check_naming(naming or CANONICAL_NAMING[arch])]
    if arch not in TRANSFORMER_ARCHS:  # only the original module names (ComfyUI's)
        return _NATIVE_IMPLEMENTATION[arch]
    naming = naming or "diffusers"
    if naming not in TRANSFORMER_NAMINGS:
        raise ValueError(f"Unknown {arch} naming {naming!r}; use one of {', '.join(TRANSFORMER_NAMINGS)}.")
    return "diffusers" if naming == "diffusers" else _NATIVE_IMPLEMENTATION[arch]


# ---- peft <-> kohya key form --------------------------------------------------------------------

def kohya_name(module_path: str, prefix: str = "lora_unet") -> str:
    """The kohya name of a module path: ``down_blocks.0.attn1`` -> ``lora_unet_down_blocks_0_attn1``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def peft_to_kohya(state: dict[str, torch.Tensor], alpha: float,
                  prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """Convert a peft-form LoRA state to kohya form (same tensor objects; alpha as 0-dim float32).

    Args:
        state: ``{"<path>.lora_A.weight": (r, in), "<path>.lora_B.weight": (out, r), ...}``.
        alpha: LoRA alpha, stored per module.
        prefix: kohya prefix.

    Returns:
        ``{"<prefix>_<path_>.lora_down.weight" / ".lora_up.weight" / ".alpha": tensor}``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for peft_suffix, kohya_suffix in PEFT_SUFFIXES.items():
            if key.endswith("." + peft_suffix):
                name = kohya_name(key[: -len(peft_suffix) - 1], prefix)
                out[f"{name}.{kohya_suffix}"] = value
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
                break
        else:
            raise ValueError(f"Unknown peft LoRA key {key!r}: expected '<module>.lora_A.weight' or "
                             "'<module>.lora_B.weight' (bias, DoRA and embedding LoRA are not supported).")
    return out


def group_kohya(state: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """kohya keys grouped by module name.

    Args:
        state: kohya-form tensors.
        prefix: kohya prefix every key must start with (``lora_unet``).

    Returns:
        ``{name: {"lora_down.weight": .., "lora_up.weight": .., "alpha": ..}}`` (alpha optional).

    Raises:
        ValueError: on keys of another form, or a module without both factors.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(prefix + "_"):
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:6]) + (", ..." if len(unknown) > 6 else "")
        raise ValueError(f"Unknown LoRA keys ({len(unknown)}): {shown}. Expected '{prefix}_<module>' + "
                         "'.lora_down.weight' / '.lora_up.weight' / '.alpha' (UNet LoRA only).")
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"LoRA module {name!r} lacks its lora_down or lora_up weight; "
                             "the file is incomplete.")
    return groups


def rank_alpha_of(groups: dict[str, dict[str, torch.Tensor]]) -> tuple[int, float]:
    """The rank and alpha shared by all modules of a LoRA (a missing alpha means alpha = rank, as in
    kohya).

    Args:
        groups: the result of ``group_kohya``.

    Returns:
        ``(rank, alpha)``.

    Raises:
        ValueError: no modules, factors that are not linear or conv LoRA factors of one rank, or
            ranks/alphas that differ between modules.
    """
    if not groups:
        raise ValueError("The LoRA state holds no lora keys.")
    pairs: dict[tuple[int, float], str] = {}
    for name, parts in groups.items():
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        linear = down.dim() == 2 and up.dim() == 2
        conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
        if not (linear or conv) or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise ValueError(f"LoRA module {name!r} has shapes down {tuple(down.shape)} / up "
                             f"{tuple(up.shape)}; expected linear factors (r, in) and (out, r), or conv "
                             "factors (r, in, kh, kw) and (out, r, 1, 1), with rank r >= 1.")
        rank = down.shape[0]
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise ValueError(f"LoRA module {name!r} has an alpha of shape {tuple(parts['alpha'].shape)}; "
                             "alpha is one number per module: the file is damaged.")
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        pairs.setdefault((rank, alpha), name)
    if len(pairs) != 1:
        detail = "; ".join(f"rank {r}, alpha {a} (e.g. {n})" for (r, a), n in sorted(pairs.items()))
        raise ValueError(f"Inconsistent LoRA ranks/alphas across modules: {detail}. "
                         "One shared rank and alpha is required.")
    return next(iter(pairs))


def _name_map(module: nn.Module, prefix: str) -> dict[str, str | None]:
    """kohya name -> real module path; None marks names two different paths collapse to."""
    mapping: dict[str, str | None] = {}
    for path, _ in module.named_modules():
        if not path:
            continue
        name = kohya_name(path, prefix)
        mapping[name] = None if name in mapping and mapping[name] != path else path
    return mapping


def kohya_to_peft(state: dict[str, torch.Tensor], module: nn.Module,
                  prefix: str = "lora_unet") -> tuple[dict[str, torch.Tensor], int, float]:
    """Convert a kohya-form LoRA state to peft form, resolving names against ``module``.

    A UNet file in the other module naming (an SD1.x file with diffusers names on a ComfyUI LDM
    UNet, an SDXL file with LDM names on a diffusers UNet) is renamed first (``convert_names``).

    Args:
        state: kohya-form tensors (``lora_down``/``lora_up``/``alpha`` per module).
        module: the model the LoRA belongs to; its real module names resolve the '_' ambiguity.
        prefix: kohya prefix.

    Returns:
        ``(peft_state, rank, alpha)``; ``peft_state`` suits ``set_lora_state_dict``.

    Raises:
        ValueError: on unknown keys, modules not found (or ambiguous) in ``module``, or ranks/alphas
            that differ between modules.
    """
    groups = group_kohya(state, prefix)
    rank, alpha = rank_alpha_of(groups)
    names = _name_map(module, prefix)
    if prefix == "lora_unet" and any(n not in names for n in groups):
        have, want = naming_of(groups), naming_of(path for path, _ in module.named_modules())
        if have and want and have != want:
            groups = group_kohya(convert_names(state, have, want, module), prefix)
    missing = sorted(n for n in groups if n not in names)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} LoRA module(s) are not in the target model: {shown}. "
                         "The LoRA was made for a different model architecture.")
    ambiguous = sorted(n for n in groups if names[n] is None)
    if ambiguous:
        raise ValueError(f"LoRA module names {ambiguous[:5]} match more than one module path once '.' "
                         "becomes '_'; this model cannot be addressed with kohya keys.")
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        path = names[name]
        out[f"{path}.lora_A.weight"] = parts["lora_down.weight"]
        out[f"{path}.lora_B.weight"] = parts["lora_up.weight"]
    return out, rank, alpha


# ---- renaming LoRA states ------------------------------------------------------------------------

def _split_key(key: str) -> tuple[str, str]:
    for suffix in PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, suffix = key.partition(".")
    if not module.startswith("lora_unet_") or suffix not in KOHYA_SUFFIXES:
        raise ValueError(f"Unknown LoRA key {key!r}: expected peft '<path>.lora_A.weight' or kohya "
                         "'lora_unet_<name>.lora_down.weight' form.")
    return module, suffix


def convert_names(state: dict[str, Any], source: str, target: str, unet_config: Any) -> dict[str, Any]:
    """Rename a LoRA state (peft or kohya form, kept) from ``source`` to ``target`` UNet naming.

    Args:
        state: peft-form (``<path>.lora_A.weight``) or kohya-form (``lora_unet_<name>.lora_down.weight``).
        source, target: ``ldm`` or ``diffusers``.
        unet_config: the UNet's structure (see ``unet_layout``).

    Returns:
        A new dict with the same values under the renamed keys.

    Raises:
        ValueError: a module with no counterpart (only transformer and res-block layers are mapped).
    """
    check_naming(source)
    check_naming(target)
    if source == target:
        return dict(state)
    paths = layout_path_pairs(unet_layout(unet_config))
    if source == "diffusers":
        paths = {d: ldm for ldm, d in paths.items()}
    names = {kohya_name(s): kohya_name(t) for s, t in paths.items()}
    assert len(set(names.values())) == len(names), "kohya names of the path map collide"
    out, unknown = {}, set()
    for key, value in state.items():
        module, suffix = _split_key(key)
        new = (names if module.startswith("lora_unet_") else paths).get(module)
        if new is None:
            unknown.add(module)
        out[f"{new}.{suffix}"] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} LoRA module(s) have no {target} counterpart in this UNet: {shown}. "
                         "Only transformer linears (attn, ff, proj_in/out) and res-block layers (conv1, conv2, "
                         "time_emb_proj, conv_shortcut) are mapped, and the UNet layout "
                         "must be the one the LoRA was made for.")
    return out


# ---- metadata -----------------------------------------------------------------------------------

def lora_metadata(arch: str | None, rank: int, alpha: float, extra: dict[str, str] | None = None,
                  naming: str | None = None) -> dict[str, str]:
    """safetensors metadata that kohya tools, A1111/Forge and ComfyUI read for a LoRA.

    Args:
        arch: ``sd15``, ``sdxl``, ``sd3`` or ``flux``; None (a model of none of them) writes only the
            ``ss_network_*`` entries. The SD3 and FLUX entries name SD3-medium and FLUX.1-dev; give
            ``modelspec.architecture`` in ``extra`` for another member of the family.
        rank, alpha: the LoRA's shared rank and alpha.
        extra: caller entries (str -> str); they override the defaults (e.g. ``modelspec.title``)
            but not the ``ss_network_*`` entries.
        naming: the file's module naming: ``ldm`` or ``diffusers`` for a UNet (default: the
            canonical one for ``arch``), ``diffusers`` (default) or ``native`` for SD3/FLUX.

    Returns:
        ``ss_network_module/dim/alpha``, ``ss_base_model_version``, ``modelspec.*`` plus ``extra``.
    """
    extra = dict(extra or {})
    clash = [k for k in NETWORK_METADATA if k in extra]
    if clash:
        raise ValueError(f"Metadata keys {clash} follow from the LoRA itself; remove them from extra.")
    network = {"ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
               "ss_network_alpha": str(float(alpha))}
    if arch is None:
        return {**network, **extra}
    base_version, architecture, resolution = ARCH_METADATA[check_lora_arch(arch)]
    return {**network, "ss_base_model_version": base_version,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": _implementation(arch, naming),
            "modelspec.title": "AlignProp LoRA", "modelspec.resolution": resolution, **extra}
