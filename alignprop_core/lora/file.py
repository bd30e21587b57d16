"""LoRA files: atomic save, load and apply (mixing two files is in `mix`).

UNet files (SD1.x, SDXL) are safetensors with kohya-style keys, which ComfyUI's LoraLoader reads
directly::

    lora_unet_<module path, '.' -> '_'>.lora_down.weight   (r, in)   = peft lora_A.weight
    lora_unet_<module path, '.' -> '_'>.lora_up.weight     (out, r)  = peft lora_B.weight
    lora_unet_<module path, '.' -> '_'>.alpha              0-dim     the update is up @ down * alpha / r

A conv layer (a res block's ``conv1``/``conv2``) has conv factors, as kohya's conv LoRA and peft
write them: down ``(r, in, kh, kw)``, up ``(out, r, 1, 1)``; the update is
``(up.flatten(1) @ down.flatten(1)).view(out, in, kh, kw) * alpha / r``.

Given an ``arch``, ``save_lora`` writes the module naming that arch's files use (SD1.x: diffusers
names, SDXL: LDM names) whichever UNet was trained, and loading renames a file of the other
naming; key conversions live in ``keys``, the UNet path map in ``unet_paths``.

SD3 and FLUX.1 files of a diffusers transformer use the diffusers transformer form
(``transformer.<path>.lora_A.weight`` / ``.lora_B.weight``, ``transformer_keys``), which diffusers
and ComfyUI both load. Those of a transformer with the original module names (ComfyUI's
``diffusion_model``: ``joint_blocks.N.x_block.attn.qkv``, ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ...) are kohya keys of those names, fused layers kept whole
(``lora_unet_double_blocks_0_img_attn_qkv``), with ``.alpha``: the form kohya sd-scripts writes for
FLUX, which ComfyUI and Forge read for both families (diffusers converts it for FLUX only). Alpha: FLUX files
keep a ``.alpha`` per module, which both honour; diffusers' SD3 loader refuses any key without
"lora" in its name, so SD3 files carry none: the scale alpha / r is multiplied into every lora_B
and the file's alpha is r (``alignprop.folded_alpha`` records the trained alpha). A file of one
family is refused on a model of another (``families.check_family``). Run settings (steps,
base model, ...) go in the safetensors metadata, never in the file name. ``save_lora_file`` writes
every file (``save_lora`` turns a model's LoRA into a ``LoraFile`` and hands it over).
``check_lora_fits`` refuses a file with NaN/Inf values or factors that do not fit the model's layers
(``alignprop_core.lora.check``) before ``apply_lora_file`` injects anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import safe_open
from torch import nn

from ..config import LoraConfig
from ..files.outputs import write_atomically
from ..files.safe_load import load_error_reason
from .check import check_lora_finite, check_module_factors
from .families import check_family, file_archs, is_diffusers_transformer, metadata_arch, model_arch
from .inject import add_lora, has_lora, lora_rank_alpha, lora_state_dict, remove_lora, set_lora_state_dict
from .keys import (CANONICAL_NAMING, NATIVE_ARCHS, check_lora_arch, convert_names, lora_metadata,
                   peft_to_kohya, rank_alpha_of)
from .transformer_keys import FACTOR_SUFFIXES, group_lora, key_form, lora_to_peft, peft_to_diffusers
from .unet_paths import check_naming, naming_of

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS_KEY = "alignprop.lora_target_modules"
FOLDED_ALPHA_KEY = "alignprop.folded_alpha"  # the trained alpha of an SD3 file whose scale is in lora_B
RESERVED_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", TARGETS_KEY)
_TRANSFORMER_CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}  # diffusers twins


@dataclass
class LoraFile:
    """A LoRA as stored on disk: its tensors (kohya or diffusers-transformer keys) plus what is needed
    to inject it."""

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


def _transformer_form(module: nn.Module, arch: str | None, naming: str | None) -> tuple[str, str] | None:
    """The SD3/FLUX family of the file ``save_lora`` writes for ``module`` and the module naming of
    its keys (``diffusers`` or ``native``), or None for a UNet file.

    ``arch`` None takes the family of an SD3/FLUX transformer in either naming; a transformer ``arch``
    needs such a transformer of that family.
    """
    have = model_arch(module)
    if arch is None:
        arch = have if have in NATIVE_ARCHS and naming is None else None
    if arch not in NATIVE_ARCHS:
        return None
    if naming is not None:
        raise ValueError(f"naming={naming!r} chooses between UNet namings; {arch} files use the module names "
                         "of the transformer that was trained (diffusers' or ComfyUI's): leave naming unset.")
    if have != arch:
        what = f"of the {have} family" if have else "not an SD3 or FLUX transformer"
        twin = f"the diffusers {_TRANSFORMER_CLASSES[arch]} or " if arch in _TRANSFORMER_CLASSES else ""
        raise ValueError(f"arch={arch!r} but the module is {what}; pass the {arch} transformer that was "
                         f"trained ({twin}ComfyUI's diffusion_model), or the arch of the module.")
    return arch, "diffusers" if is_diffusers_transformer(module) else "native"


def save_lora(path: str | os.PathLike, module: nn.Module, cfg: LoraConfig,
              metadata: dict[str, str] | None = None, dtype: str | torch.dtype = "fp32",
              arch: str | None = None, naming: str | None = None) -> Path:
    """Write the LoRA of ``module`` as a safetensors file, atomically (``save_lora_file``).

    Args:
        path: destination; must end in ``.safetensors``.
        module: a module with LoRA injected.
        cfg: the LoRA config it was built with (rank/alpha are checked against the module).
        metadata: extra str -> str entries (step count, base model, settings).
        dtype: tensor dtype on disk: ``fp32`` (default), ``fp16`` or ``bf16``.
        arch: ``sd15``, ``sdxl``, ``sd3`` or ``flux``: write that family's keys and its
            ``ss_base_model_version``/``modelspec.*`` metadata. UNets: kohya keys in the arch's module
            naming (sd15: diffusers, sdxl: LDM, as kohya sd-scripts does, so A1111/Forge, ComfyUI and
            diffusers load every key). SD3/FLUX: a diffusers transformer in the diffusers
            transformer form that diffusers and ComfyUI load; ComfyUI's diffusion model in kohya
            keys of its own (fused) layers, which ComfyUI and Forge load. None: an SD3/FLUX
            transformer is written as its family; any other module as kohya keys of its own paths,
            with no family metadata.
        naming: ``ldm`` or ``diffusers`` to override the UNet naming chosen by ``arch``.

    Returns:
        The path written.

    Raises:
        ValueError: bad suffix, dtype, metadata, arch, naming, a module of another family than
            ``arch``, a NaN/Inf value, or cfg not matching the module's LoRA.
    """
    path = _check_path(path)
    _resolve_dtype(dtype)
    if arch is not None:
        check_lora_arch(arch)
    if naming is not None:
        check_naming(naming)
    rank, alpha = lora_rank_alpha(module)
    if rank != cfg.rank or not math.isclose(alpha, cfg.alpha):
        raise ValueError(f"cfg says rank={cfg.rank}, alpha={cfg.alpha} but the module's LoRA has "
                         f"rank={rank}, alpha={alpha}; pass the config the LoRA was built with.")
    transformer = _transformer_form(module, arch, naming)
    if transformer is not None and transformer[1] == "diffusers":
        state = peft_to_diffusers(lora_state_dict(module), alpha)
        lora = LoraFile(state=state, rank=rank, alpha=alpha, target_modules=tuple(cfg.target_modules))
        return save_lora_file(path, lora, metadata, dtype, transformer[0])
    state = peft_to_kohya(lora_state_dict(module), alpha)
    if transformer is not None:  # ComfyUI's SD3/FLUX: its own module names are the file's
        lora = LoraFile(state=state, rank=rank, alpha=alpha, target_modules=tuple(cfg.target_modules))
        return save_lora_file(path, lora, metadata, dtype, transformer[0])
    target = naming or (CANONICAL_NAMING[arch] if arch is not None else None)
    if target is not None:
        source = naming_of(n for n, _ in module.named_modules())
        if source is None:
            raise ValueError("arch/naming need a UNet with diffusers (down_blocks) or LDM (input_blocks) "
                             "module names; pass the UNet itself or leave arch and naming unset.")
        state = convert_names(state, source, target, module)
    lora = LoraFile(state=state, rank=rank, alpha=alpha, target_modules=tuple(cfg.target_modules))
    return save_lora_file(path, lora, metadata, dtype, arch)


def _fold_alpha(lora: LoraFile) -> LoraFile:
    """``lora`` in the form diffusers' SD3 loader takes: no ``.alpha`` keys (it refuses keys without
    "lora" in the name) and the scale alpha / r multiplied into every lora_B, so alpha = r and the
    update is unchanged for every reader."""
    scale = lora.alpha / lora.rank
    state = {k: (v * scale if scale != 1 and k.endswith(".lora_B.weight") else v)
             for k, v in lora.state.items() if not k.endswith(".alpha")}
    metadata = dict(lora.metadata)
    if scale != 1:
        metadata[FOLDED_ALPHA_KEY] = repr(float(lora.alpha))
    return dataclasses.replace(lora, state=state, alpha=float(lora.rank), metadata=metadata)


def save_lora_file(path: str | os.PathLike, lora: LoraFile, metadata: dict[str, str] | None = None,
                   dtype: str | torch.dtype = "fp32", arch: str | None = None) -> Path:
    """Write a ``LoraFile`` (e.g. the result of ``mix_loras``) as a safetensors file, atomically.

    Every LoRA file is written here. The file is written to a temporary name in the same directory
    and renamed into place, so a failure never leaves a partial file at ``path``; parent
    directories are created. What is written can be loaded again: finite values, one rank and alpha.
    A diffusers-form SD3 LoRA (``arch`` or, without it, the LoRA's own metadata says ``sd3``) is
    written with its alpha folded into lora_B (see the module docstring).

    Args:
        path: destination; must end in ``.safetensors``.
        lora: the LoRA to write; its own metadata is kept, ``metadata`` entries are added on top.
        metadata: extra str -> str entries.
        dtype: tensor dtype on disk: ``fp32`` (default), ``fp16`` or ``bf16``.
        arch: ``sd15``, ``sdxl``, ``sd3`` or ``flux`` to add that family's metadata (the keys are
            written as they are; key names of another family are refused).

    Returns:
        The path written.

    Raises:
        ValueError: bad suffix, dtype, metadata or arch, inconsistent ranks, a rank/alpha that differs
            from the tensors', or a NaN/Inf tensor.
    """
    path = _check_path(path)
    torch_dtype = _resolve_dtype(dtype)
    if arch is not None:
        check_lora_arch(arch)
    check_lora_finite(lora.state)
    groups = group_lora(lora.state)
    rank, alpha = rank_alpha_of(groups)
    # alpha is stored as float32, so it may differ from the Python float in its last digits
    if rank != lora.rank or not math.isclose(alpha, lora.alpha, rel_tol=1e-6):
        raise ValueError(f"The LoraFile says rank={lora.rank}, alpha={lora.alpha} but its tensors have "
                         f"rank={rank}, alpha={alpha}; build it with the rank and alpha of its tensors.")
    form = key_form(lora.state)
    named, _ = file_archs(lora.state)
    if arch is not None and named and arch not in named:
        raise ValueError(f"arch={arch!r} but the LoRA's module names are those of {' or '.join(named)}; "
                         "give the arch the LoRA was trained for.")
    if form == "diffusers" and (arch or metadata_arch(lora.metadata)) == "sd3":
        lora = _fold_alpha(lora)
    # modelspec.implementation names the module naming of the keys as they are written
    if arch is None:
        naming = None
    elif arch in NATIVE_ARCHS:
        naming = "diffusers" if form == "diffusers" else "native"
    else:
        naming = naming_of(groups)
    meta = _file_metadata(lora, metadata, arch, naming)
    # alpha stays float32: it is a scalar whose exact value sets the scale.
    tensors = {k: (v.float() if k.endswith(".alpha") else v.to(torch_dtype)).detach().cpu().contiguous()
               for k, v in lora.state.items()}
    return write_atomically(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


def load_lora(path: str | os.PathLike, module: nn.Module | None = None) -> LoraFile:
    """Read a LoRA safetensors file: kohya keys (UNets; SD3/FLUX in their original module names) or
    diffusers transformer keys (SD3/FLUX).

    Args:
        path: the ``.safetensors`` file.
        module: optional target model; if given, the file's family must be the model's and every
            LoRA module must exist in it.

    Returns:
        A ``LoraFile`` (tensors on CPU in their stored dtype).

    Raises:
        FileNotFoundError: naming the path if it does not exist.
        ValueError: if the file holds no lora keys, unknown keys, or inconsistent ranks/alphas, or
            (with ``module``) is for another model family or has modules the model lacks.
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
    lora = lora_from_state(state, metadata, source=repr(str(path)))
    if module is not None:
        check_family(state, metadata, module)
        lora_to_peft(state, module)
    return lora


def lora_from_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    source: str = "the LoRA") -> LoraFile:
    """A ``LoraFile`` of a LoRA's tensors, read as ``load_lora`` reads those of a file.

    Args:
        state: kohya or diffusers-transformer keys (a file's, or a dict such as ComfyUI's LORA_MODEL).
        metadata: the file's metadata; None without any (no target modules; family from key names).
        source: what the tensors came from, for messages (a quoted path, an input's name).

    Returns:
        A ``LoraFile`` of the tensors (detached, on the CPU, dtypes kept); rank and alpha read off
        the factors (a module without ``.alpha`` has alpha = rank).

    Raises:
        ValueError: an entry that is not a name and a tensor, no lora keys, keys of no known form,
            a module without both factors, differing ranks/alphas, unreadable target metadata.
    """
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        what = "entry that is" if len(bad) == 1 else "entries that are"
        raise ValueError(f"{source} holds {len(bad)} {what} not a name and a tensor ({shown}); a LoRA is a "
                         "dict of key names to tensors.")
    state = {k: v.detach().cpu() for k, v in state.items()}
    metadata = dict(metadata or {})
    if not any(k.endswith(FACTOR_SUFFIXES) for k in state):
        raise ValueError(f"{source} holds no lora keys (no '.lora_down.weight'/'.lora_up.weight' or "
                         "'.lora_A.weight'/'.lora_B.weight'); it is not a LoRA.")
    rank, alpha = rank_alpha_of(group_lora(state))
    targets: tuple[str, ...] = ()
    if TARGETS_KEY in metadata:
        try:
            targets = tuple(json.loads(metadata[TARGETS_KEY]))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source} has unreadable {TARGETS_KEY} metadata: {err}.") from err
    return LoraFile(state=state, rank=rank, alpha=alpha, target_modules=targets, metadata=metadata)


def _fitted(lora: LoraFile, module: nn.Module) -> tuple[dict[str, torch.Tensor], int, float]:
    """``lora_to_peft`` of a LoRA checked to be finite, of the model's family and to fit ``module``
    shape for shape."""
    check_lora_finite(lora.state)
    check_family(lora.state, lora.metadata, module)
    state, rank, alpha = lora_to_peft(lora.state, module)
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


def _paths(peft_state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    return tuple(sorted(k[: -len(".lora_A.weight")] for k in peft_state if k.endswith(".lora_A.weight")))


def lora_modules(lora: LoraFile, module: nn.Module) -> tuple[str, ...]:
    """The paths of the layers of ``module`` that ``lora`` patches, a ``LoraConfig.target_modules``
    that injects exactly its modules (for a LoRA whose metadata names no target list).

    Raises:
        ValueError: as ``check_lora_fits``.
    """
    return _paths(_fitted(lora, module)[0])


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
    add_lora(module, LoraConfig(rank=rank, alpha=alpha, target_modules=_paths(state)))
    try:
        set_lora_state_dict(module, state)
    except Exception:
        remove_lora(module)
        raise
