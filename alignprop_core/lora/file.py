"""LoRA files: atomic save, load and apply (mixing two files is in `mix`).

Files are safetensors with kohya-style keys, which ComfyUI's LoraLoader reads directly::

    lora_unet_<module path, '.' -> '_'>.lora_down.weight   (r, in)   = peft lora_A.weight
    lora_unet_<module path, '.' -> '_'>.lora_up.weight     (out, r)  = peft lora_B.weight
    lora_unet_<module path, '.' -> '_'>.alpha              0-dim     the update is up @ down * alpha / r

A conv layer (a res block's ``conv1``/``conv2``) has conv factors, as kohya's conv LoRA and peft
write them: down ``(r, in, kh, kw)``, up ``(out, r, 1, 1)``; the update is
``(up.flatten(1) @ down.flatten(1)).view(out, in, kh, kw) * alpha / r``.

Given an ``arch``, ``save_lora`` writes the module naming that arch's files use (SD1.x: diffusers
names, SDXL: LDM names) whichever UNet was trained, and loading renames a file of the other
naming; key conversions live in ``keys``, the UNet path map in ``unet_paths``. Run settings (steps,
base model, ...) go in the safetensors metadata, never in the file name. ``save_lora_file`` writes
every file (``save_lora`` turns a model's LoRA into a ``LoraFile`` and hands it over).
``check_lora_fits`` refuses a file with NaN/Inf values or factors that do not fit the model's layers
(``alignprop_core.lora.check``) before ``apply_lora_file`` injects anything.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import safe_open
from torch import nn

from ..config import LoraConfig
from ..files.outputs import write_atomically
from ..files.safe_load import load_error_reason
from .check import check_lora_finite, check_module_factors
from .inject import add_lora, has_lora, lora_rank_alpha, lora_state_dict, remove_lora, set_lora_state_dict
from .keys import (CANONICAL_NAMING, convert_names, group_kohya, kohya_to_peft, lora_metadata, peft_to_kohya,
                   rank_alpha_of)
from .unet_paths import check_arch, check_naming, naming_of

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS_KEY = "alignprop.lora_target_modules"
RESERVED_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", TARGETS_KEY)


@dataclass
class LoraFile:
    """A LoRA as stored on disk: kohya-form tensors plus what is needed to inject it."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in SAVE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in SAVE_DTYPES:
        return SAVE_DTYPES[dtype]
    raise ValueError(f"Unsupported save dtype {dtype!r}; use one of {', '.join(SAVE_DTYPES)}.")


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {str(path)!r} must end in .safetensors (the format ComfyUI loads).")
    return path


def _file_metadata(lora: LoraFile, metadata: dict[str, str] | None, arch: str | None,
                   naming: str | None) -> dict[str, str]:
    """The file's metadata: the LoRA's own entries (``lora_metadata`` for ``arch`` and the keys'
    ``naming``, its target modules), then ``lora.metadata`` and ``metadata`` on top."""
    own = {k: v for k, v in lora.metadata.items() if k not in RESERVED_METADATA}
    extra = {**own, **(metadata or {})}
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"Metadata keys and values must be str; convert {bad[:5]} (e.g. json.dumps).")
    clash = [k for k in extra if k in RESERVED_METADATA]
    if clash:
        raise ValueError(f"Metadata keys {clash} are set from the LoRA itself (rank, alpha, target modules); "
                         "rename yours.")
    base = lora_metadata(arch, lora.rank, lora.alpha, naming=naming)
    return {**base, TARGETS_KEY: json.dumps(list(lora.target_modules)), **extra}


def save_lora(path: str | os.PathLike, module: nn.Module, cfg: LoraConfig,
              metadata: dict[str, str] | None = None, dtype: str | torch.dtype = "fp32",
              arch: str | None = None, naming: str | None = None) -> Path:
    """Write the LoRA of ``module`` as a kohya-form safetensors file, atomically (``save_lora_file``).

    Args:
        path: destination; must end in ``.safetensors``.
        module: a module with LoRA injected.
        cfg: the LoRA config it was built with (rank/alpha are checked against the module).
        metadata: extra str -> str entries (step count, base model, settings).
        dtype: tensor dtype on disk: ``fp32`` (default), ``fp16`` or ``bf16``.
        arch: ``sd15`` or ``sdxl``: write that arch's module naming (sd15: diffusers, sdxl: LDM, as
            kohya sd-scripts does, so A1111/Forge, ComfyUI and diffusers load every key) and its
            ``ss_base_model_version``/``modelspec.*`` metadata. None keeps the module's own paths.
        naming: ``ldm`` or ``diffusers`` to override the naming chosen by ``arch``.

    Returns:
        The path written.

    Raises:
        ValueError: bad suffix, dtype, metadata, arch, naming, a NaN/Inf value, or cfg not matching
            the module's LoRA.
    """
    path = _check_path(path)
    _resolve_dtype(dtype)
    if arch is not None:
        check_arch(arch)
    if naming is not None:
        check_naming(naming)
    rank, alpha = lora_rank_alpha(module)
    if rank != cfg.rank or not math.isclose(alpha, cfg.alpha):
        raise ValueError(f"cfg says rank={cfg.rank}, alpha={cfg.alpha} but the module's LoRA has "
                         f"rank={rank}, alpha={alpha}; pass the config the LoRA was built with.")
    state = peft_to_kohya(lora_state_dict(module), alpha)
    target = naming or (CANONICAL_NAMING[arch] if arch is not None else None)
    if target is not None:
        source = naming_of(n for n, _ in module.named_modules())
        if source is None:
            raise ValueError("arch/naming need a UNet with diffusers (down_blocks) or LDM (input_blocks) "
                             "module names; pass the UNet itself or leave arch and naming unset.")
        state = convert_names(state, source, target, module)
    lora = LoraFile(state=state, rank=rank, alpha=alpha, target_modules=tuple(cfg.target_modules))
    return save_lora_file(path, lora, metadata, dtype, arch)


def save_lora_file(path: str | os.PathLike, lora: LoraFile, metadata: dict[str, str] | None = None,
                   dtype: str | torch.dtype = "fp32", arch: str | None = None) -> Path:
    """Write a ``LoraFile`` (e.g. the result of ``mix_loras``) as a safetensors file, atomically.

    Every LoRA file is written here. The file is written to a temporary name in the same directory
    and renamed into place, so a failure never leaves a partial file at ``path``; parent
    directories are created. What is written can be loaded again: finite values, one rank and alpha.

    Args:
        path: destination; must end in ``.safetensors``.
        lora: the LoRA to write; its own metadata is kept, ``metadata`` entries are added on top.
        metadata: extra str -> str entries.
        dtype: tensor dtype on disk: ``fp32`` (default), ``fp16`` or ``bf16``.
        arch: ``sd15`` or ``sdxl`` to add that arch's metadata (the keys are written as they are).

    Returns:
        The path written.

    Raises:
        ValueError: bad suffix, dtype, metadata or arch, inconsistent ranks, a rank/alpha that differs
            from the tensors', or a NaN/Inf tensor.
    """
    path = _check_path(path)
    torch_dtype = _resolve_dtype(dtype)
    if arch is not None:
        check_arch(arch)
    check_lora_finite(lora.state)
    groups = group_kohya(lora.state, "lora_unet")
    rank, alpha = rank_alpha_of(groups)
    # alpha is stored as float32, so it may differ from the Python float in its last digits
    if rank != lora.rank or not math.isclose(alpha, lora.alpha, rel_tol=1e-6):
        raise ValueError(f"The LoraFile says rank={lora.rank}, alpha={lora.alpha} but its tensors have "
                         f"rank={rank}, alpha={alpha}; build it with the rank and alpha of its tensors.")
    # modelspec.implementation names the module naming of the keys as they are written
    meta = _file_metadata(lora, metadata, arch, naming_of(groups) if arch is not None else None)
    # alpha stays float32: it is a scalar whose exact value sets the scale.
    tensors = {k: (v.float() if k.endswith(".alpha") else v.to(torch_dtype)).detach().cpu().contiguous()
               for k, v in lora.state.items()}
    return write_atomically(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


def load_lora(path: str | os.PathLike, module: nn.Module | None = None) -> LoraFile:
    """Read a kohya-form LoRA safetensors file.

    Args:
        path: the ``.safetensors`` file.
        module: optional target model; if given, every LoRA module is checked to exist in it.

    Returns:
        A ``LoraFile`` (tensors on CPU in their stored dtype).

    Raises:
        FileNotFoundError: naming the path if it does not exist.
        ValueError: if the file holds no lora keys, unknown keys, or inconsistent ranks/alphas.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {str(path)!r}; check the path (or the ComfyUI "
                                "loras folder).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file ({load_error_reason(err)}); it "
                         "is damaged or incomplete: copy it again, or train it again.") from err
    if not any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in state):
        raise ValueError(f"{str(path)!r} holds no lora keys (no '.lora_down.weight'/'.lora_up.weight'); "
                         "it is not a LoRA file.")
    rank, alpha = rank_alpha_of(group_kohya(state, "lora_unet"))
    if module is not None:
        kohya_to_peft(state, module)
    targets: tuple[str, ...] = ()
    if TARGETS_KEY in metadata:
        try:
            targets = tuple(json.loads(metadata[TARGETS_KEY]))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{str(path)!r} has unreadable {TARGETS_KEY} metadata: {err}.") from err
    return LoraFile(state=state, rank=rank, alpha=alpha, target_modules=targets, metadata=metadata)


def _fitted(lora: LoraFile, module: nn.Module) -> tuple[dict[str, torch.Tensor], int, float]:
    """``kohya_to_peft`` of a LoRA checked to be finite and to fit ``module`` shape for shape."""
    check_lora_finite(lora.state)
    state, rank, alpha = kohya_to_peft(lora.state, module)
    # Renaming keeps the tensor objects, so each peft key finds the key the user's file has.
    file_key = {id(value): key for key, value in lora.state.items()}
    check_module_factors(state, module, {k: file_key.get(id(v), k) for k, v in state.items()})
    return state, rank, alpha


def check_lora_fits(lora: LoraFile, module: nn.Module) -> None:
    """Check, before anything is injected, that ``lora`` can be applied to ``module``.

    Every tensor must be finite; every LoRA module must exist in ``module`` (after LDM <-> diffusers
    renaming) and its factors must fit the layer: Linear ``(r, in)`` / ``(out, r)``, Conv2d
    ``(r, in, kh, kw)`` / ``(out, r, 1, 1)``. ``module`` is left untouched.

    Args:
        lora: a loaded or mixed ``LoraFile``.
        module: the model it is meant for (a diffusers UNet or ComfyUI's ``diffusion_model``).

    Raises:
        ValueError: naming the first non-finite key, the modules missing from ``module``, or the
            first LoRA key whose shape does not fit, with its shape and the layer's.
    """
    _fitted(lora, module)


def apply_lora_file(module: nn.Module, lora: LoraFile) -> None:
    """Put the weights of ``lora`` into ``module``, injecting LoRA layers first if there are none.

    Fresh injection targets exactly the module paths present in the file, so file and model match
    one to one. A module that already has LoRA must have the same rank, alpha and modules. The
    checks of ``check_lora_fits`` run first, so a broken or foreign file changes nothing.

    Args:
        module: the model (modified in place).
        lora: a loaded or mixed ``LoraFile``.

    Raises:
        ValueError: if the file is not finite or does not fit the model or the existing LoRA (nothing
            is half-applied on a fresh module: injected layers are removed again on failure).
    """
    state, rank, alpha = _fitted(lora, module)
    if has_lora(module):
        have = lora_rank_alpha(module)
        if have[0] != rank or not math.isclose(have[1], alpha):
            raise ValueError(f"The module's LoRA has rank={have[0]}, alpha={have[1]} but the file has "
                             f"rank={rank}, alpha={alpha}; call remove_lora first to load it fresh.")
        set_lora_state_dict(module, state)
        return
    paths = tuple(sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")))
    add_lora(module, LoraConfig(rank=rank, alpha=alpha, target_modules=paths))
    try:
        set_lora_state_dict(module, state)
    except Exception:
        remove_lora(module)
        raise
