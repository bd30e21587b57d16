"""The diffusers transformer key form of SD3 and FLUX.1 LoRA files, and reading a file of either form.

SD3 and FLUX.1 files hold the peft keys under a ``transformer.`` prefix, the form diffusers'
``load_lora_weights`` and ComfyUI's LoRA key map (``comfy.lora.model_lora_keys_unet``, through
``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``) both read for these families::

    transformer.<module path>.lora_A.weight  (r, in)
    transformer.<module path>.lora_B.weight  (out, r)
    transformer.<module path>.alpha          0-dim, optional (alpha = r without it)

The module path is the diffusers one (``transformer_blocks.0.attn.to_q``), dots kept, so it names
the module without the lookup kohya names need. UNet files, and SD3/FLUX files of a model with the
original module names (ComfyUI's ``joint_blocks``/``double_blocks``), keep the kohya form (``keys``); inside
the package both forms are grouped per module under the kohya part names (``group_lora``), so
rank, alpha, checks and mixing work the same on either.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .keys import KOHYA_SUFFIXES, PEFT_SUFFIXES, group_kohya, kohya_to_peft, rank_alpha_of

TRANSFORMER_PREFIX = "transformer"
# diffusers-form suffix -> the kohya part name it is grouped under
DIFFUSERS_PARTS = {**PEFT_SUFFIXES, "alpha": "alpha"}
FACTOR_SUFFIXES = (*KOHYA_SUFFIXES[:2], *PEFT_SUFFIXES)  # the suffixes of factor keys in either form


def peft_to_diffusers(state: dict[str, torch.Tensor], alpha: float | None = None,
                      prefix: str = TRANSFORMER_PREFIX) -> dict[str, torch.Tensor]:
    """Convert a peft-form LoRA state to the diffusers transformer form (same tensor objects).

    Args:
        state: ``{"<path>.lora_A.weight": (r, in), "<path>.lora_B.weight": (out, r), ...}``.
        alpha: LoRA alpha, stored per module as a 0-dim float32 ``.alpha``; None stores none
            (readers then take alpha = rank).
        prefix: the component prefix (``transformer``).

    Returns:
        ``{"<prefix>.<path>.lora_A.weight" / ".lora_B.weight" [/ "<prefix>.<path>.alpha"]: tensor}``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        suffix = next((s for s in PEFT_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"Unknown peft LoRA key {key!r}: expected '<module>.lora_A.weight' or "
                             "'<module>.lora_B.weight' (bias, DoRA and embedding LoRA are not supported).")
        out[f"{prefix}.{key}"] = value
        if alpha is not None:
            out[f"{prefix}.{key[: -len(suffix) - 1]}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def key_form(keys: Iterable[str]) -> str:
    """``diffusers`` for keys of the transformer form (``transformer.<module>...``), else ``kohya``."""
    return "diffusers" if any(k.startswith(TRANSFORMER_PREFIX + ".") for k in keys) else "kohya"


def group_lora(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The keys of a LoRA file, kohya or diffusers-transformer form, grouped by module name.

    Args:
        state: the file's tensors; all keys in one form.

    Returns:
        ``{name: {"lora_down.weight": .., "lora_up.weight": .., "alpha": ..}}`` (alpha optional),
        where ``name`` is the key less its suffix (``lora_unet_<...>`` or ``transformer.<path>``).

    Raises:
        ValueError: on keys of another form (or a mix of forms), or a module without both factors.
    """
    if key_form(state) == "kohya":
        return group_kohya(state, "lora_unet")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        suffix = next((s for s in DIFFUSERS_PARTS if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(TRANSFORMER_PREFIX + "."):
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix) - 1], {})[DIFFUSERS_PARTS[suffix]] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:6]) + (", ..." if len(unknown) > 6 else "")
        raise ValueError(f"Unknown LoRA keys ({len(unknown)}): {shown}. A transformer LoRA has only "
                         f"'{TRANSFORMER_PREFIX}.<module>' + '.lora_A.weight' / '.lora_B.weight' / '.alpha' "
                         "keys (one key form per file).")
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"LoRA module {name!r} lacks its lora_A or lora_B weight; the file is incomplete.")
    return groups


def lora_key(name: str, part: str) -> str:
    """The file key of one part (``lora_down.weight``, ``lora_up.weight`` or ``alpha``) of the module
    ``name`` of a ``group_lora`` result, in the form the name itself has."""
    if name.startswith(TRANSFORMER_PREFIX + "."):
        suffix = next(s for s, p in DIFFUSERS_PARTS.items() if p == part)
        return f"{name}.{suffix}"
    return f"{name}.{part}"


def lora_to_peft(state: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict[str, torch.Tensor], int, float]:
    """Convert a LoRA file's state, kohya or diffusers-transformer form, to peft form for ``module``.

    Args:
        state: the file's tensors.
        module: the model the LoRA belongs to (a diffusers transformer for the transformer form).

    Returns:
        ``(peft_state, rank, alpha)``; ``peft_state`` suits ``set_lora_state_dict``.

    Raises:
        ValueError: as ``kohya_to_peft`` and ``group_lora``; or modules the model does not have.
    """
    if key_form(state) == "kohya":
        return kohya_to_peft(state, module)
    groups = group_lora(state)
    rank, alpha = rank_alpha_of(groups)
    start = len(TRANSFORMER_PREFIX) + 1
    paths = {path for path, _ in module.named_modules() if path}
    missing = sorted(n for n in groups if n[start:] not in paths)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} LoRA module(s) are not in the target model: {shown}. The LoRA was made "
                         "for a different model architecture (transformer LoRAs name the modules of the "
                         "diffusers SD3/FLUX transformer).")
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        out[f"{name[start:]}.lora_A.weight"] = parts["lora_down.weight"]
        out[f"{name[start:]}.lora_B.weight"] = parts["lora_up.weight"]
    return out, rank, alpha
