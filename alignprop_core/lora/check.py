"""Does a LoRA fit the model? Finite values, and factor shapes that match the layers they target.

A LoRA adds ``up @ down * alpha / r`` to a layer's weight, so each factor pair must agree with that
weight's shape (``keys`` documents the key form)::

    Linear weight (out, in)          down (r, in)           up (out, r)
    Conv2d weight (out, in, kh, kw)  down (r, in, kh, kw)   up (out, r, 1, 1)

A file whose key names exist in a model but whose shapes differ was made for another model (an
SDXL LoRA on SD1.5: the cross-attention ``to_k`` takes 2048 features there, 768 here). Hosts that
do not check shapes skip such a layer with a log line and render without the LoRA, so these checks
run before anything is injected or patched. A NaN or Inf anywhere would turn every image into
noise (and a run continued from it would save another broken file), so it is refused too.

The functions here speak tensors and shapes only; ``file.check_lora_fits`` applies them to a
``LoraFile`` and a torch module, the ComfyUI node to ComfyUI's weight patches.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

Shape = tuple[int, ...]


def check_lora_finite(state: Mapping[str, torch.Tensor], what: str = "the LoRA") -> None:
    """ValueError naming the first key (sorted) of ``state`` that holds a NaN or an infinity.

    Args:
        state: LoRA tensors (any key form).
        what: how the message names the LoRA (e.g. its file name).
    """
    for key in sorted(state):
        value = state[key]
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(value).sum())
        inf = int((~finite).sum()) - nan
        found = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)
        raise ValueError(f"{what} is broken: its tensor {key!r} holds {found} value(s) (e.g. saved from a "
                         "diverged run); retrain it or pick another LoRA.")


def expected_factor_shapes(weight_shape: Sequence[int], rank: int) -> tuple[Shape, Shape]:
    """``(down, up)`` shapes a rank-``rank`` LoRA needs on a weight of ``weight_shape``.

    Args:
        weight_shape: ``(out, in)`` of a linear layer or ``(out, in, kh, kw)`` of a convolution.
        rank: the LoRA rank ``r``.

    Returns:
        ``((r, in), (out, r))`` or ``((r, in, kh, kw), (out, r, 1, 1))``.
    """
    weight_shape = tuple(int(s) for s in weight_shape)
    out, rest = weight_shape[0], weight_shape[1:]
    return (rank, *rest), (out, rank, *(1,) * (len(rest) - 1))


def factor_mismatch(down_shape: Sequence[int], up_shape: Sequence[int], weight_shape: Sequence[int],
                    exact: bool = True) -> str | None:
    """Which factor does not fit ``weight_shape``: ``"down"``, ``"up"``, or None when both fit.

    Args:
        down_shape, up_shape: the LoRA factors' shapes; the rank is ``down_shape[0]``.
        weight_shape: the target layer's weight shape.
        exact: True needs the exact forms of ``expected_factor_shapes`` (peft's layers do);
            False accepts any factors whose flattened product has the weight's shape, as ComfyUI's
            weight patching does (e.g. linear factors on a 1x1 convolution).
    """
    down_shape, up_shape = tuple(down_shape), tuple(up_shape)
    if not down_shape or not up_shape:
        return "down" if not down_shape else "up"
    want_down, want_up = expected_factor_shapes(weight_shape, down_shape[0])
    if exact:
        return "down" if down_shape != want_down else "up" if up_shape != want_up else None
    if (down_shape[0], math.prod(down_shape[1:])) != (want_down[0], math.prod(want_down[1:])):
        return "down"
    if up_shape[:2] != want_up[:2] or math.prod(up_shape[2:]) != 1:
        return "up"
    return None


def shape_error(key: str, file_shape: Sequence[int], layer: str, weight_shape: Sequence[int],
                needed: Sequence[int]) -> ValueError:
    """The error for a LoRA tensor that does not fit its layer; names key, both shapes and the fix."""
    return ValueError(
        f"LoRA key {key!r} has shape {tuple(file_shape)} but the model layer {layer!r} has weight shape "
        f"{tuple(weight_shape)} (this LoRA tensor would need {tuple(needed)}): the LoRA was made for another "
        "model (e.g. SDXL instead of SD1.5); use it with the model it was trained for, or pick another LoRA.")


def check_factors(down_key: str, down: torch.Tensor, up_key: str, up: torch.Tensor, layer: str,
                  weight_shape: Sequence[int], exact: bool = True) -> None:
    """ValueError (``shape_error``) if the factor pair does not fit the weight, down checked first.

    Args:
        down_key, up_key: the tensors' keys as the user's file names them.
        down, up: the factors.
        layer: the model layer (or weight key) they target, for the message.
        weight_shape: that layer's weight shape.
        exact: see ``factor_mismatch``.
    """
    which = factor_mismatch(down.shape, up.shape, weight_shape, exact)
    if which is None:
        return
    want_down, want_up = expected_factor_shapes(weight_shape, down.shape[0] if down.dim() else 0)
    if which == "down":
        raise shape_error(down_key, down.shape, layer, weight_shape, want_down)
    raise shape_error(up_key, up.shape, layer, weight_shape, want_up)


def _target_weight(module: nn.Module, path: str, key: str) -> torch.Tensor:
    """The weight matrix or kernel of the layer at ``path`` (under a peft wrapper, its base layer's)."""
    layer = module.get_submodule(path)
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    # by the weight, not the class: hosts have their own Linear/Conv2d classes (e.g. ComfyUI's ops)
    weight = getattr(base, "weight", None)
    if not torch.is_tensor(weight) or weight.dim() < 2:
        raise ValueError(f"LoRA key {key!r} targets the model's {path!r}, a {type(base).__name__} without "
                         "a weight matrix; only Linear and Conv2d layers take a LoRA, so the LoRA was "
                         "made for another model: pick the model it was trained for.")
    return weight


def check_module_factors(peft_state: Mapping[str, torch.Tensor], module: nn.Module,
                         file_keys: Mapping[str, str] | None = None) -> None:
    """Check every ``<path>.lora_A/B.weight`` pair of ``peft_state`` against ``module``'s layers.

    Pairs are checked in the order of their file keys, so the error names the first mismatch.

    Args:
        peft_state: peft-form LoRA tensors whose module paths exist in ``module``.
        module: the target model.
        file_keys: peft key -> the key the user's file uses (after renaming), for the messages.

    Raises:
        ValueError: naming the first LoRA key whose shape does not fit, its shape and the layer's.
    """
    file_keys = dict(file_keys or {})
    paths = {k[: -len(".lora_A.weight")] for k in peft_state if k.endswith(".lora_A.weight")}
    named = {path: (file_keys.get(f"{path}.lora_A.weight", f"{path}.lora_A.weight"),
                    file_keys.get(f"{path}.lora_B.weight", f"{path}.lora_B.weight")) for path in paths}
    for path in sorted(paths, key=lambda p: min(named[p])):
        down_key, up_key = named[path]
        weight = _target_weight(module, path, down_key)
        check_factors(down_key, peft_state[f"{path}.lora_A.weight"], up_key,
                      peft_state[f"{path}.lora_B.weight"], path, weight.shape, exact=True)
