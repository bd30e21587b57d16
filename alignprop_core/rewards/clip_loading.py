"""Load frozen CLIP towers from local files only: open_clip checkpoints and ComfyUI clip_vision files.

Nothing here downloads: the model graph comes from a config (open_clip's bundled JSON configs, or a
config inferred from the tensor shapes of a ComfyUI file) and the weights from the caller's path.
Weights are read with safetensors or ``torch.load(weights_only=True)``, never unrestricted pickle.

* `load_open_clip` builds ``open_clip.create_model(arch, pretrained=None)`` and loads an open_clip
  state dict strictly (HPSv2 checkpoints wrap it in ``{"state_dict": ...}`` with ``module.`` prefixes).
* `load_comfy_clip_vision` reads the layout ComfyUI's CLIPVisionLoader reads (``comfy/clip_vision.py``):
  transformers ``CLIPVisionModelWithProjection`` keys, ``vision_model.encoder.layers.N...`` and
  ``visual_projection.weight``, and returns its ``image_embeds`` (post-LayerNorm CLS token, projected);
  `clip_vision_from_state_dict` does the same from weights in memory (e.g. a loaded CLIP_VISION's).
"""
from __future__ import annotations

import contextlib
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files.safe_load import load_error_reason, quiet_pickle_protocol_warning  # noqa: F401 (re-exported)
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

_RESBLOCK_RE = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
_HF_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
# Attention heads cannot be read off the weights (q, k, v are hidden x hidden whatever the split):
# OpenAI ViT-B (768) has 12 heads of 64, ViT-L (1024) 16 of 64, LAION ViT-H (1280), ViT-g (1408)
# and ViT-bigG (1664) 16 of 80, 88 and 104, as in open_clip's configs and ComfyUI's clip_vision JSONs.
_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


@dataclass
class ImageEncoder:
    """A frozen image tower: preprocessed pixels -> un-normalised image embedding."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) normalised -> (B, D)
    image_size: int  # S, side of the square input in pixels
    mean: Sequence[float]  # per-channel normalisation mean the tower was trained with
    std: Sequence[float]  # per-channel normalisation std the tower was trained with
    embed_dim: int  # D
    device: torch.device  # where the weights live
    dtype: torch.dtype  # dtype of the weights
    module: torch.nn.Module  # the underlying network, kept for inspection


def require_file(path: str | Path | None, what: str, expected: str, typical_size: str,
                 source: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError saying which file is expected.

    Args:
        path: the caller's path.
        what: what the file is, e.g. "LAION aesthetic head".
        expected: the usual file name, e.g. "sac+logos+ava1-l14-linearMSE.pth".
        typical_size: its usual size, e.g. "3.7 MB".
        source: where users normally get it.
    """
    p = Path(path).expanduser() if path else None
    if p is None or not p.is_file():
        raise FileNotFoundError(
            f"{what} not found at {str(path)!r}: expected a file like {expected} (about {typical_size}), "
            f"usually downloaded from {source}. Download it and pass its local path.")
    return p


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor state dict safely, unwrapping ``{"state_dict": ...}`` and ``module.`` prefixes.

    Args:
        path: a .safetensors file, or a .pt/.pth/.bin file loadable with ``weights_only=True``.

    Returns:
        Mapping of parameter name to CPU tensor.

    Raises:
        ValueError: the file is not a plain tensor state dict (e.g. a TorchScript archive or a
            pickled model object, which are not loaded because unpickling can run code).
    """
    path = Path(path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load_weights(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a tensor state dict (found {type(obj).__name__}); "
                         "give a checkpoint saved from model.state_dict().")
    # DistributedDataParallel training (as in HPSv2) prefixes every key with "module.".
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file ({load_error_reason(err)}); it is "
                         "damaged or incomplete: download or copy it again.") from err


def _torch_load_weights(path: Path) -> Any:
    """torch.load with weights_only=True; every failure becomes a ValueError naming the file."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); download or copy the checkpoint again.")
    try:
        with quiet_pickle_protocol_warning():
            try:
                # mmap keeps a multi-GB checkpoint out of RAM until load_state_dict copies it.
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise ValueError(_unsafe_message(path, err)) from err
    except Exception as err:  # noqa: BLE001 - any other failure means a damaged or foreign file
        raise ValueError(f"{path} could not be read as a PyTorch state dict ({load_error_reason(err)}); "
                         "the file is damaged or not a checkpoint: download it again or use its "
                         ".safetensors version.") from err


def weights_error(folder: Path, names: Sequence[str], err: BaseException, fix: str) -> ValueError:
    """A ValueError naming the weight file in `folder` (the first of `names` present) that a
    ``from_pretrained`` failed to read, with torch's reason cut to its informative part."""
    present = [folder / n for n in names if (folder / n).is_file()]
    where = present[0] if present else folder
    return ValueError(f"{where} cannot be read ({load_error_reason(err)}); it is damaged, incomplete or "
                      f"holds pickled objects other than tensors (refused, never run): {fix}.")


def _unsafe_message(path: Path, err: Exception) -> str:
    return (f"{path} is not a PyTorch state dict that can be read safely with torch.load(weights_only=True) "
            f"({load_error_reason(err)}); TorchScript archives (e.g. OpenAI's ViT-L-14.pt) and pickled "
            "model objects are refused because unpickling can run code: use the .safetensors version "
            "or re-save it with torch.save(model.state_dict()).")


def _vit_signature(sd: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """Shape facts of an open_clip ViT state dict, or None when it is not one."""
    conv = sd.get("visual.conv1.weight")
    if conv is None or conv.ndim != 4:
        return None
    layers = {int(m.group(1)) for k in sd if (m := _RESBLOCK_RE.match(k))}
    proj = sd.get("visual.proj")
    return {"width": conv.shape[0], "patch_size": conv.shape[-1], "layers": len(layers),
            "embed_dim": proj.shape[1] if proj is not None else -1}


def _config_signature(cfg: dict) -> dict[str, int] | None:
    vision = cfg.get("vision_cfg", {})
    if not all(isinstance(vision.get(k), int) for k in ("width", "patch_size", "layers")):
        return None  # timm or ResNet tower: no simple ViT shape to compare
    return {"width": vision["width"], "patch_size": vision["patch_size"], "layers": vision["layers"],
            "embed_dim": cfg.get("embed_dim", -1)}


def _describe(sig: dict[str, int]) -> str:
    return (f"ViT width {sig['width']}, patch {sig['patch_size']}, {sig['layers']} layers, "
            f"embed dim {sig['embed_dim']}")


def _archs_matching(sig: dict[str, int]) -> list[str]:
    import open_clip

    names = [n for n in open_clip.list_models()
             if _config_signature(open_clip.get_model_config(n) or {}) == sig]
    return sorted(names, key=len)[:4]  # shortest names are the canonical ones (ViT-B-32 before -quickgelu)


def _check_arch(arch: str, cfg: dict, sd: dict[str, torch.Tensor], path: Path) -> None:
    if any(k.startswith("vision_model.") for k in sd):
        raise ValueError(f"{path} is a transformers/ComfyUI clip_vision file (vision_model.* keys), not "
                         f"an open_clip {arch} checkpoint; load it with load_comfy_clip_vision or pass it "
                         "as clip_vision_path.")
    expected, found = _config_signature(cfg), _vit_signature(sd)
    if expected is not None and found is not None and expected != found:
        like = _archs_matching(found)
        looks = f"looks like {', '.join(like)}" if like else "matches no bundled open_clip config"
        raise ValueError(f"checkpoint {path} does not fit architecture {arch} ({_describe(expected)}): "
                         f"the file has {_describe(found)} and {looks}. Pass the matching arch or the "
                         f"{arch} checkpoint.")


def freeze(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move `module` to device/dtype, switch it to eval mode and stop gradients to its weights."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_random_init_warning():
    # open_clip logs "Model initialized randomly" on the root logger; the weights load right after,
    # so the message would only alarm users. Only that record is dropped.
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_open_clip(arch: str, checkpoint: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Callable]:
    """Build open_clip `arch` with no pretrained weights and load a local checkpoint strictly.

    Args:
        arch: an open_clip config name from ``open_clip.list_models()``, e.g. "ViT-H-14".
        checkpoint: local .safetensors/.pt/.pth/.bin open_clip state dict (optionally wrapped in
            ``{"state_dict": ...}`` with ``module.`` prefixes, as HPSv2 saves it).
        device: where the frozen model lives.
        dtype: dtype of the frozen model's weights.

    Returns:
        (model, tokenizer): the frozen model in eval mode and open_clip's tokenizer for `arch`
        (its BPE vocabulary ships inside the open_clip package).

    Raises:
        FileNotFoundError: `checkpoint` does not exist.
        ValueError: unknown `arch`, an arch that would need a download, or a checkpoint made for
            another architecture (the message names both).
    """
    import open_clip

    path = require_file(checkpoint, f"open_clip {arch} checkpoint", f"open_clip_pytorch_model.bin for {arch}",
                        "0.6-4 GB for ViT-B to ViT-H", "the model's Hugging Face page")
    if ":" in arch or arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip arch {arch!r}; give a bundled config name such as "
                         "ViT-L-14-quickgelu or ViT-H-14 (see open_clip.list_models()).")
    cfg = open_clip.get_model_config(arch)
    if "hf_model_name" in cfg.get("text_cfg", {}) or "hf_tokenizer_name" in cfg.get("text_cfg", {}):
        raise ValueError(f"arch {arch} uses a Hugging Face text tower or tokenizer that open_clip would "
                         "download; only self-contained CLIP archs are supported offline.")
    state_dict = read_state_dict(path)
    _check_arch(arch, cfg, state_dict, path)
    with _quiet_random_init_warning():
        model = open_clip.create_model(arch, pretrained=None)
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        # Old checkpoints store a scalar, current open_clip a 1-element tensor (or vice versa).
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not match open_clip arch {arch}: {err}") from err
    del state_dict
    return freeze(model, device, dtype), open_clip.get_tokenizer(arch)


def open_clip_image_encoder(model: torch.nn.Module) -> ImageEncoder:
    """Wrap an open_clip model's image tower, with the preprocessing open_clip attaches to it."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if not isinstance(size, int):  # open_clip keeps (H, W)
        if size[0] != size[1]:
            raise ValueError(f"non-square CLIP input {tuple(size)} is not supported.")
        size = size[0]
    param = next(model.parameters())
    return ImageEncoder(embed=model.encode_image, image_size=int(size),
                        mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
                        std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
                        embed_dim=int(model.visual.output_dim), device=param.device, dtype=param.dtype,
                        module=model)


def _clip_vision_config(sd: dict[str, torch.Tensor], hidden_act: str | None):
    from transformers import CLIPVisionConfig

    patch = sd["vision_model.embeddings.patch_embedding.weight"]  # (hidden, 3, p, p)
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    layers = len({int(m.group(1)) for k in sd if (m := _HF_LAYER_RE.match(k))})
    num_positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(num_positions - 1)  # positions = grid^2 patches + 1 class token
    if grid * grid != num_positions - 1:
        raise ValueError(f"position embedding of {num_positions} rows is not a square grid plus a "
                         "class token.")
    if hidden_act is None:
        # ComfyUI's configs: OpenAI ViT-L/14 uses QuickGELU, the LAION ViT-H/bigG towers exact GELU.
        hidden_act = "quick_gelu" if (hidden, layers) == (1024, 24) else "gelu"
    return CLIPVisionConfig(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)),
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["visual_projection.weight"].shape[0], image_size=grid * patch_size,
        patch_size=patch_size, hidden_act=hidden_act, layer_norm_eps=1e-5)


def load_comfy_clip_vision(path: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, hidden_act: str | None = None,
                           num_attention_heads: int | None = None) -> ImageEncoder:
    """Load a ComfyUI ``models/clip_vision`` file as a differentiable image-embedding function.

    The architecture is read off the tensor shapes, so ViT-L/14 (the aesthetic predictor's tower),
    ViT-H/14 and ViT-bigG/14 files all load; text-tower keys of a full CLIP file are ignored, as
    ComfyUI ignores them.

    Args:
        path: local .safetensors (or weights-only .pt/.bin) with transformers CLIPVisionModelWithProjection
            keys: ``vision_model.embeddings.patch_embedding.weight``, ``vision_model.encoder.layers.N...``,
            ``visual_projection.weight``.
        device: where the frozen tower lives.
        dtype: dtype of its weights.
        hidden_act: MLP activation; None picks ComfyUI's choice (QuickGELU for ViT-L/14, GELU otherwise).
        num_attention_heads: None uses the head count of the OpenAI/LAION ViT of that width
            (hidden size / 64 for other widths).

    Returns:
        An `ImageEncoder` whose ``embed`` gives ``image_embeds`` (B, projection_dim).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not in this layout (e.g. an open_clip checkpoint).
    """
    p = require_file(path, "ComfyUI clip_vision ViT-L/14 model", "clip-vit-large-patch14.safetensors "
                     "(model.safetensors of openai/clip-vit-large-patch14)",
                     "1.2 GB vision-only, 1.7 GB full",
                     "huggingface.co/openai/clip-vit-large-patch14 into ComfyUI/models/clip_vision")
    return clip_vision_from_state_dict(read_state_dict(p), device, dtype, hidden_act, num_attention_heads,
                                       source=str(p))


def clip_vision_from_state_dict(sd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32, hidden_act: str | None = None,
                                num_attention_heads: int | None = None,
                                source: str = "the clip_vision state dict") -> ImageEncoder:
    """`load_comfy_clip_vision` for weights already in memory, in the same key layout: e.g. the
    state dict of the model ComfyUI's CLIPVisionLoader loaded (``ClipVisionModel.get_sd()``).

    The weights are copied into a new transformers model (ComfyUI's inference-mode tensors are fine
    as a source). `source` names the weights in error messages.
    """
    from transformers import CLIPVisionModelWithProjection

    p = source
    if "vision_model.embeddings.patch_embedding.weight" not in sd or "visual_projection.weight" not in sd:
        hint = (" It has open_clip keys (visual.conv1.weight): pass it as clip_checkpoint with its arch."
                if "visual.conv1.weight" in sd else "")
        raise ValueError(f"{p} is not a clip_vision model with projection: expected keys "
                         "vision_model.embeddings.patch_embedding.weight and "
                         f"visual_projection.weight.{hint}")
    sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))
          and not k.endswith("position_ids")}  # position_ids is a non-persistent buffer in transformers
    config = _clip_vision_config(sd, hidden_act)
    if num_attention_heads is not None:
        config.num_attention_heads = num_attention_heads
    model = CLIPVisionModelWithProjection(config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{p} does not match the CLIP vision layout inferred from its shapes: "
                         f"{err}") from err
    model = freeze(model, device, dtype)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).image_embeds  # (B, projection_dim)

    return ImageEncoder(embed=embed, image_size=config.image_size, mean=OPENAI_CLIP_MEAN,
                        std=OPENAI_CLIP_STD, embed_dim=config.projection_dim, device=torch.device(device),
                        dtype=dtype, module=model)
