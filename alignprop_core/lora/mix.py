"""Mixing two LoRA files (AlignProp's adapter mixing): interpolate the factors or the weight update."""
from __future__ import annotations

import math

import torch

from .file import LoraFile
from .keys import rank_alpha_of
from .transformer_keys import group_lora, key_form, lora_key

MIX_MODES = ("weights", "delta")
# metadata naming the model family, kept when both LoRAs agree on it
FAMILY_METADATA = ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                   "modelspec.resolution")


def mix_loras(a: LoraFile, b: LoraFile, t: float, mode: str) -> LoraFile:
    """Interpolate two LoRAs (AlignProp's adapter mixing), ``t=0`` is ``a`` and ``t=1`` is ``b``.

    ``weights`` interpolates every factor, ``(1-t)*down_a + t*down_b`` and likewise for up, as in the
    paper; it needs equal rank and alpha. ``delta`` interpolates the weight update exactly:
    ``dW = (1-t)*dW_a + t*dW_b`` by stacking the factors (rank ``r_a + r_b``, the alpha/rank scales
    folded into ``up`` and ``alpha = rank`` so the stored scale is 1). Keys keep the LoRAs' form; a
    diffusers-form (SD3/FLUX) result has ``.alpha`` keys only where ``a`` has them, so an SD3 mix
    stays loadable by diffusers.

    Args:
        a, b: LoRAs over the same modules.
        t: mixing weight; values outside [0, 1] extrapolate.
        mode: ``weights`` or ``delta``.

    Returns:
        A new ``LoraFile`` (float32 tensors) with mix info in its metadata.

    Raises:
        ValueError: unknown mode (lists the modes), different key sets, or weights-mode rank/alpha
            mismatch.
    """
    if mode not in MIX_MODES:
        raise ValueError(f"Unknown mix mode {mode!r}; use one of {', '.join(MIX_MODES)}.")
    ga, gb = group_lora(a.state), group_lora(b.state)
    if set(ga) != set(gb):
        only_a, only_b = sorted(set(ga) - set(gb)), sorted(set(gb) - set(ga))
        raise ValueError(f"The LoRAs cover different modules (only in a: {only_a[:3]}, only in b: "
                         f"{only_b[:3]}); mix LoRAs trained with the same target modules and model.")
    rank_alpha_of(ga), rank_alpha_of(gb)  # each one well formed (rank >= 1, one alpha)
    for name in sorted(ga):
        da, db = ga[name]["lora_down.weight"], gb[name]["lora_down.weight"]
        ua, ub = ga[name]["lora_up.weight"], gb[name]["lora_up.weight"]
        if da.shape[1:] != db.shape[1:] or ua.shape[0] != ub.shape[0]:
            raise ValueError(f"The LoRAs' module {name!r} has layers of different sizes (down "
                             f"{tuple(da.shape)} vs {tuple(db.shape)}, up {tuple(ua.shape)} vs "
                             f"{tuple(ub.shape)}); mix LoRAs trained for the same model.")
    t = float(t)
    state: dict[str, torch.Tensor] = {}
    # kohya files always carry alpha; diffusers-form ones only where the input does (SD3 files never)
    with_alpha = key_form(a.state) == "kohya" or any("alpha" in parts for parts in ga.values())
    if mode == "weights":
        if a.rank != b.rank or not math.isclose(a.alpha, b.alpha):
            raise ValueError(f"mode 'weights' needs equal rank and alpha, got rank {a.rank}/{b.rank}, "
                             f"alpha {a.alpha}/{b.alpha}; use mode 'delta' instead.")
        for name in ga:
            for part in ("lora_down.weight", "lora_up.weight"):
                wa, wb = ga[name][part].float(), gb[name][part].float()
                state[lora_key(name, part)] = (1 - t) * wa + t * wb
        rank, alpha = a.rank, a.alpha
    else:
        rank = a.rank + b.rank
        alpha = float(rank)  # stored scale alpha / rank == 1: the scales live in the up factors
        for name in ga:
            pa, pb = ga[name], gb[name]
            up = torch.cat([(1 - t) * (a.alpha / a.rank) * pa["lora_up.weight"].float(),
                            t * (b.alpha / b.rank) * pb["lora_up.weight"].float()], dim=1)
            down = torch.cat([pa["lora_down.weight"].float(), pb["lora_down.weight"].float()], dim=0)
            state[lora_key(name, "lora_down.weight")] = down
            state[lora_key(name, "lora_up.weight")] = up
    if with_alpha:
        for name in ga:
            state[lora_key(name, "alpha")] = torch.tensor(alpha, dtype=torch.float32)
    targets = a.target_modules if a.target_modules == b.target_modules else ()
    family = {k: a.metadata[k] for k in FAMILY_METADATA if k in a.metadata and a.metadata[k] == b.metadata.get(k)}
    metadata = {**family, "alignprop.mix_mode": mode, "alignprop.mix_t": repr(t)}
    return LoraFile(state=state, rank=rank, alpha=alpha, target_modules=targets, metadata=metadata)
