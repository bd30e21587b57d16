"""LoRA adapters on a frozen denoiser: injection, trainable parameters, state, scale, removal.

AlignProp trains only low-rank adapters on the denoiser (by default on its attention projections)
while every base weight stays frozen and bit-identical. peft does the layer surgery
(``peft.inject_adapter_in_model``); this module adds what training needs around it:

* deterministic initialisation from ``LoraConfig.init_seed`` that leaves the global RNG untouched and
  does not depend on module order, naming or device: each ``lora_A`` is drawn on the CPU from its own
  generator keyed by the seed and the module's diffusers path, so an LDM UNet (ComfyUI) and its
  diffusers twin start from the same adapter,
* adapter weights in float32 even on a half-precision base (float64 bases keep float64, so finite
  difference tests stay exact),
* a stable, name-sorted parameter order (optimiser state and checkpoints line up across runs),
* strict state loading: missing, unexpected or mis-shaped keys raise instead of being skipped,
* target suffixes in diffusers names everywhere: on an LDM UNet (ComfyUI) the res-block names
  ``conv1``, ``conv2``, ``time_emb_proj``, ``conv_shortcut`` also target their LDM twins
  (``in_layers.2``, ``out_layers.3``, ``emb_layers.1``, ``skip_connection``), and on an SD3/FLUX
  model with the original module names the attention names target their fused twins
  (``families.NATIVE_TWINS``: ``to_q`` -> ``x_block.attn.qkv`` / ``img_attn.qkv``, ...).

State dicts here use peft's key form (``<module path>.lora_A.weight`` / ``.lora_B.weight``); the
file format (kohya keys) lives in ``alignprop_core.lora.file``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator

import torch
from torch import nn

import peft
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..config import LoraConfig
from .families import native_targets
from .unet_paths import RESNET_LAYERS, ldm_to_diffusers_paths, naming_of

# peft's default adapter slot; AlignProp only ever trains one adapter per module.
ADAPTER = "default"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # Same rule as peft for a list of targets: exact name or a dotted suffix.
    return any(name == t or name.endswith("." + t) for t in targets)


def _with_ldm_names(targets: tuple[str, ...], names: list[str]) -> tuple[str, ...]:
    """``targets`` plus the LDM names of its diffusers res-block suffixes, when ``names`` are LDM."""
    if naming_of(names) != "ldm":
        return targets
    ldm_of = {diffusers: ldm for ldm, diffusers in RESNET_LAYERS.items()}
    return targets + tuple(ldm_of[t] for t in targets if t in ldm_of and ldm_of[t] not in targets)


def _with_native_names(targets: tuple[str, ...], names: list[str]) -> tuple[str, ...]:
    """``targets`` plus the native twins of its diffusers names, on an SD3/FLUX/Z-Image model with
    the original (ComfyUI) module names."""
    arch = ("sd3" if "joint_blocks.0.x_block" in names else
            "flux" if "double_blocks.0.img_attn" in names else
            "zimage" if "cap_embedder" in names and "layers.0.attention.qkv" in names else None)
    return native_targets(targets, arch) if arch else targets


def _lora_layers(module: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether peft LoRA layers are injected into ``module``.

    Args:
        module: any torch module.

    Returns:
        True if at least one peft tuner layer (or a leftover ``peft_config``) is present.
    """
    return hasattr(module, "peft_config") or any(
        isinstance(m, BaseTunerLayer) for m in module.modules())


def _rng_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def _canonical_paths(module: nn.Module) -> dict[str, str]:
    """Module path -> the name its LoRA init is keyed by: the diffusers path where one exists."""
    names = [n for n, _ in module.named_modules()]
    if naming_of(names) != "ldm":
        return {}
    try:
        return ldm_to_diffusers_paths("sd15", module)  # layout read off the module names; arch unused
    except ValueError:
        return {}


def _module_seed(init_seed: int, path: str) -> int:
    digest = hashlib.sha256(f"{init_seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _seed_lora_a(module: nn.Module, init_seed: int) -> None:
    """Redraw every ``lora_A`` as peft's default (Kaiming-uniform, a=sqrt(5)) from its own generator.

    The generator of a layer is seeded by ``init_seed`` and the layer's diffusers path, and the draw
    happens in float32 on the CPU, so the initial adapter is the same whatever the module naming (LDM
    or diffusers), registration order, device or dtype.
    """
    canonical = _canonical_paths(module)
    for name, layer in _lora_layers(module):
        if ADAPTER not in layer.lora_A:
            continue
        weight = layer.lora_A[ADAPTER].weight
        generator = torch.Generator().manual_seed(_module_seed(init_seed, canonical.get(name, name)))
        draw = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator)
        weight.copy_(draw)


def add_lora(module: nn.Module, cfg: LoraConfig, device: torch.device | None = None) -> list[nn.Parameter]:
    """Freeze ``module`` and inject trainable LoRA adapters into the layers named by ``cfg``.

    The adapter starts as an exact no-op (``lora_B`` is zero) with ``lora_A`` drawn from a generator
    seeded by ``cfg.init_seed``; the caller's RNG state is restored afterwards. Adapter weights are
    float64 where the base layer is float64 and float32 otherwise, on `device` (default: the base
    layer's device).

    Args:
        module: the denoiser (e.g. a diffusers ``UNet2DConditionModel``); modified in place.
        cfg: rank, alpha, target-module suffixes and init seed.
        device: where the model computes. A host that keeps some base weights on another device and
            casts them per forward (ComfyUI's partial loading) passes its compute device, so the
            adapters sit where the activations are rather than beside an offloaded weight.

    Returns:
        The trainable LoRA parameters, sorted by parameter name.

    Raises:
        ValueError: if ``module`` already carries LoRA, or no module name matches ``cfg.target_modules``.
    """
    if has_lora(module):
        raise ValueError("This module already has LoRA layers injected; load weights into them with "
                         "set_lora_state_dict (or apply_lora_file), or call remove_lora first.")
    modules = [(n, m) for n, m in module.named_modules() if n]
    names = [n for n, _ in modules]
    targets = _with_native_names(_with_ldm_names(tuple(cfg.target_modules), names), names)
    # An Identity holds no weight to adapt (ComfyUI's skip_connection where the channels stay the
    # same); peft is given the matched layers by full path so it never sees one.
    paths = [n for n, m in modules if _matches(n, targets) and not isinstance(m, nn.Identity)]
    if not paths:
        sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"No module matches target_modules {list(targets)}; targets are name suffixes "
                         f"such as 'to_q'. Modules that exist include: {sample}.")

    was_trainable = [p for p in module.parameters() if p.requires_grad]
    module.requires_grad_(False)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=paths,
                               init_lora_weights=True)
    # peft draws lora_A from the global RNG in registration order; fork_rng keeps the caller's stream
    # untouched, and _seed_lora_a then redraws every lora_A from a per-module generator.
    with torch.random.fork_rng(devices=_rng_devices(module)):
        try:
            peft.inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
        except Exception as err:
            remove_lora(module)  # never leave a half-injected model behind
            for p in was_trainable:
                p.requires_grad_(True)
            detail = " ".join(str(err).split())  # peft embeds multi-line module reprs
            detail = detail if len(detail) <= 300 else detail[:150] + " ... " + detail[-150:]
            raise ValueError(f"peft could not inject LoRA into {list(targets)}: {detail} Target only "
                             "linear/conv layers such as to_q, to_k, to_v, to_out.0.") from err

    for _, layer in _lora_layers(module):
        base = layer.get_base_layer()
        base_dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
        # Keep the trainable weights in float32 on half-precision bases: fp16/bf16 updates lose small
        # gradient steps; autocast mixes the two on CUDA and peft casts the LoRA output back.
        dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        where = device if device is not None else next(base.parameters()).device
        for adapters in (layer.lora_A, layer.lora_B):
            adapters[ADAPTER].to(device=where, dtype=dtype)
    _seed_lora_a(module, cfg.init_seed)
    params = lora_parameters(module)
    for _, p in params:
        p.requires_grad_(True)
    return [p for _, p in params]


def lora_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LoRA parameters of ``module`` with their full names, sorted by name.

    Args:
        module: a module prepared by ``add_lora``.

    Returns:
        ``(name, parameter)`` pairs, names as in ``module.named_parameters()``; empty without LoRA.
    """
    out: list[tuple[str, nn.Parameter]] = []
    for name, layer in _lora_layers(module):
        for attr in ("lora_A", "lora_B"):
            for pname, p in getattr(layer, attr).named_parameters():
                out.append((f"{name}.{attr}.{pname}" if name else f"{attr}.{pname}", p))
    return sorted(out, key=lambda item: item[0])


def _require_lora(module: nn.Module, action: str) -> None:
    if not _lora_layers(module):
        raise ValueError(f"Cannot {action}: the module has no LoRA layers; call add_lora "
                         "(or apply_lora_file) first.")


def lora_rank_alpha(module: nn.Module) -> tuple[int, float]:
    """The rank and alpha shared by all LoRA layers of ``module``.

    Args:
        module: a module with LoRA injected.

    Returns:
        ``(rank, alpha)``.

    Raises:
        ValueError: if there is no LoRA, or the layers disagree (not something add_lora produces).
    """
    _require_lora(module, "read the LoRA rank")
    pairs = {(int(layer.r[ADAPTER]), float(layer.lora_alpha[ADAPTER]))
             for _, layer in _lora_layers(module)}
    if len(pairs) != 1:
        raise ValueError(f"The LoRA layers use different (rank, alpha) pairs {sorted(pairs)}; "
                         "one shared rank and alpha is expected.")
    return pairs.pop()


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``module`` in peft key form, detached and cloned.

    Args:
        module: a module with LoRA injected.

    Returns:
        ``{"<module path>.lora_A.weight": (r, in), "<module path>.lora_B.weight": (out, r), ...}``,
        sorted by key; changing the returned tensors never touches the module.
    """
    _require_lora(module, "read the LoRA state")
    state = peft.get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: state[k].detach().clone() for k in sorted(state)}


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def set_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights (peft key form) into the LoRA layers already injected into ``module``.

    Keys and shapes must match the injected adapters exactly; values are copied (and cast to the
    adapter dtype/device).

    Args:
        module: a module with LoRA injected (``add_lora``) of the same rank and targets.
        state: ``{"<module path>.lora_A.weight": ..., "<module path>.lora_B.weight": ...}``.

    Raises:
        ValueError: listing missing or unexpected keys, or keys whose shapes differ.
    """
    _require_lora(module, "load a LoRA state")
    expected = {k: v.shape for k, v in peft.get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise ValueError("The LoRA state does not match the injected adapters (" + "; ".join(parts)
                         + "). Was it saved from a different model or target_modules?")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in sorted(state)
           if tuple(state[k].shape) != tuple(expected[k])]
    if bad:
        raise ValueError(f"LoRA tensor shapes differ from the injected adapters ({_short(bad, 3)}); "
                         "the rank or the base model differs — inject with the file's rank.")
    result = peft.set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    leftover = list(getattr(result, "unexpected_keys", []) or [])
    if leftover:
        raise ValueError(f"peft did not place these LoRA keys: {_short(leftover)}.")


def remove_lora(module: nn.Module) -> None:
    """Undo ``add_lora``: put every wrapped layer's original base layer back in place.

    Base weights are the very same tensors as before injection (never merged). Parameters stay
    frozen (``requires_grad=False``); re-enable them yourself if you need to. A module without LoRA
    is left as it is.

    Args:
        module: the module to restore, in place.

    Raises:
        ValueError: if ``module`` itself is a LoRA layer (it cannot replace itself; unwrap its parent).
    """
    wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        if not name:
            raise ValueError("remove_lora was given a LoRA layer itself; call it on the parent module "
                             "or use layer.get_base_layer().")
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if getattr(parent, child, None) is layer:  # nested wrappers are reached via the outer one
            setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


def set_lora_scale(module: nn.Module, scale: float) -> None:
    """Multiply the LoRA effect by ``scale`` (0 disables it, 1 is the trained adapter).

    The factor replaces any earlier one (it is not cumulative). Used to render before/after images
    with the same module.

    Args:
        module: a module with LoRA injected.
        scale: factor on ``alpha / rank``; 0 gives exactly the base model's output.
    """
    _require_lora(module, "set the LoRA scale")
    for _, layer in _lora_layers(module):
        layer.set_scale(ADAPTER, float(scale))


@contextlib.contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Run the base model: every LoRA layer's scaling is 0 inside, restored on exit (also on error).

    The adapter weights keep ``requires_grad`` (peft's ``disable_adapters`` would clear it), so the
    context can be entered inside a training step, and again when a gradient checkpoint recomputes
    that step in backward: each entry saves and restores the values it found, so nesting is safe.

    Args:
        module: a module with LoRA injected (e.g. ``backend.lora_target``).

    Raises:
        ValueError: if ``module`` has no LoRA layers.
    """
    _require_lora(module, "turn the LoRA adapters off")
    layers = [layer for _, layer in _lora_layers(module) if ADAPTER in layer.scaling]
    saved = [layer.scaling[ADAPTER] for layer in layers]
    try:
        for layer in layers:
            layer.scaling[ADAPTER] = 0.0
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.scaling[ADAPTER] = value


def _factor_matrices(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in'), B (out, r)) of a Linear or Conv LoRA layer, so that its delta is B @ A.

    A conv adapter's A is a (r, in, kh, kw) kernel and its B a 1x1 (out, r, 1, 1) one; flattening A's
    kernel into its input axis gives the delta weight reshaped to (out, in * kh * kw).
    """
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    if b.dim() > 2 and any(size != 1 for size in b.shape[2:]):
        raise ValueError(f"LoRA B of shape {tuple(b.shape)} is not a 1x1 kernel; its weight change is "
                         "not B @ A.")
    return a.flatten(1), b.flatten(1)


def lora_delta_l2(module: nn.Module) -> torch.Tensor:
    """Sum over LoRA layers of ||s B A||_F^2, the squared size of the weight change, s = the scaling.

    Differentiable in the adapter weights. ``B A`` is never formed (a (out, in) matrix per layer):
    ||B A||_F^2 = trace(B^T B A A^T) = sum((B^T B) * (A A^T)), two r x r products.

    Args:
        module: a module with LoRA injected.

    Returns:
        A scalar tensor in the adapters' dtype (float32, float64 on a float64 base), on their device.
    """
    _require_lora(module, "measure the LoRA weight change")
    total = None
    for _, layer in _lora_layers(module):
        if ADAPTER not in layer.lora_A:
            continue
        a, b = _factor_matrices(layer)
        term = float(layer.scaling[ADAPTER]) ** 2 * ((b.T @ b) * (a @ a.T)).sum()
        total = term if total is None else total + term.to(total.device)
    return total
