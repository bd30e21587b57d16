"""Mixing two LoRA files (AlignProp's adapter mixing): interpolate the factors or the weight update."""
from __future__ import annotations

import math

import torch

from .file import LoraFile
from .keys import group_kohya, rank_alpha_of

MIX_MODES = ("weights", "delta")


def mix_loras(a: LoraFile, b: LoraFile, t: float, mode: str) -> LoraFile:
    """Interpolate two LoRAs (AlignProp's adapter mixing), ``t=0`` is ``a`` and ``t=1`` is ``b``.

    ``weights`` interpolates every factor, ``(1-t)*down_a + t*down_b`` and likewise for up, as in the
    paper; it needs equal rank and alpha. ``delta`` interpolates the weight update exactly:
    ``dW = (1-t)*dW_a + t*dW_b`` by stacking the factors (rank ``r_a + r_b``, the alpha/rank scales
    folded into ``up`` and ``alpha = rank`` so the stored scale is 1).

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
    ga, gb = group_kohya(a.state, "lora_unet"), group_kohya(b.state, "lora_unet")
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
    if mode == "weights":
        if a.rank != b.rank or not math.isclose(a.alpha, b.alpha):
            raise ValueError(f"mode 'weights' needs equal rank and alpha, got rank {a.rank}/{b.rank}, "
                             f"alpha {a.alpha}/{b.alpha}; use mode 'delta' instead.")
        for name in ga:
            for suffix in ("lora_down.weight", "lora_up.weight"):
                wa, wb = ga[name][suffix].float(), gb[name][suffix].float()
                state[f"{name}.{suffix}"] = (1 - t) * wa + t * wb
            state[f"{name}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
        rank, alpha = a.rank, a.alpha
    else:
        rank = a.rank + b.rank
        alpha = float(rank)  # stored scale alpha / rank == 1: the scales live in the up factors
        for name in ga:
            pa, pb = ga[name], gb[name]
            up = torch.cat([(1 - t) * (a.alpha / a.rank) * pa["lora_up.weight"].float(),
                            t * (b.alpha / b.rank) * pb["lora_up.weight"].float()], dim=1)
            down = torch.cat([pa["lora_down.weight"].float(), pb["lora_down.weight"].float()], dim=0)
            state[f"{name}.lora_down.weight"] = down
            state[f"{name}.lora_up.weight"] = up
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    targets = a.target_modules if a.target_modules == b.target_modules else ()
    metadata = {"alignprop.mix_mode": mode, "alignprop.mix_t": repr(t)}
    return LoraFile(state=state, rank=rank, alpha=alpha, target_modules=targets, metadata=metadata)
