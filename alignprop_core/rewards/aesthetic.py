"""LAION "improved aesthetic predictor" reward, the aesthetic reward of AlignProp (Prabhudesai et al. 2023).

Reproduces christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``: the OpenAI CLIP
ViT-L/14 image embedding, L2-normalised, goes through an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1
(dropout between the first four layers, inactive at inference) trained on SAC + LOGOS + AVA ratings,
so the score is on the 1-10 rating scale. The head file ``sac+logos+ava1-l14-linearMSE.pth`` holds
the state dict ``layers.{0,2,4,6,7}.{weight,bias}``.

The CLIP tower comes from a local open_clip checkpoint (`clip_checkpoint`), a ComfyUI clip_vision
file (`clip_vision_path`) or the weights of a clip_vision model already loaded, e.g. by ComfyUI's
CLIPVisionLoader (`clip_vision_state_dict`). OpenAI's ViT-L/14 uses QuickGELU, hence the default open_clip arch
"ViT-L-14-quickgelu"; plain "ViT-L-14" (exact GELU) is for LAION-trained towers.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .base import FunctionReward, check_images
from .spec import RewardSpec
from .clip_loading import (ImageEncoder, clip_vision_from_state_dict, freeze, load_comfy_clip_vision,
                           load_open_clip, open_clip_image_encoder, read_state_dict, require_file)
from .preprocess import clip_preprocess

AESTHETIC_HEAD_MD5 = "b1047fd767a00134b8fd6529bf19521a"  # sac+logos+ava1-l14-linearMSE.pth
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SOURCE = "github.com/christophschuhmann/improved-aesthetic-predictor"


class AestheticHead(nn.Module):
    """The predictor's MLP; module indices match the checkpoint's ``layers.N`` keys."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)  # (B, 1)


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_aesthetic_head(head_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> AestheticHead:
    """Load the MLP head, warning when the file is not the published one.

    Args:
        head_path: local ``sac+logos+ava1-l14-linearMSE.pth`` (or any head with the same keys).
        device: where the frozen head lives.
        dtype: dtype of its weights.

    Returns:
        The frozen head; its input size is read from ``layers.0.weight``.
    """
    path = require_file(head_path, "LAION aesthetic head", AESTHETIC_HEAD_FILE, "3.7 MB",
                        AESTHETIC_HEAD_SOURCE)
    sd = read_state_dict(path)  # first: an unreadable file is an error, not a warning about its md5
    md5 = file_md5(path)
    if md5 != AESTHETIC_HEAD_MD5:
        warnings.warn(f"aesthetic head {path} has md5 {md5}, not {AESTHETIC_HEAD_MD5} of the published "
                      f"{AESTHETIC_HEAD_FILE}; scores will not be on the LAION aesthetic scale unless this "
                      "is an intended replacement.", UserWarning, stacklevel=3)
    if "layers.0.weight" not in sd:
        raise ValueError(f"{path} is not an aesthetic head: expected keys "
                         f"layers.{{0,2,4,6,7}}.{{weight,bias}}, got {sorted(sd)[:6]}.")
    head = AestheticHead(input_size=sd["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not have the aesthetic head layout: {err}") from err
    return freeze(head, device, dtype)


def make_aesthetic(head_path: str | Path, clip_checkpoint: str | Path | None = None,
                   clip_vision_path: str | Path | None = None, clip_arch: str = "ViT-L-14-quickgelu",
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   clip_vision_state_dict: dict[str, torch.Tensor] | None = None) -> FunctionReward:
    """LAION aesthetic score of each image (about 1-10, higher is more aesthetic); prompts are ignored.

    Args:
        head_path: local ``sac+logos+ava1-l14-linearMSE.pth``.
        clip_checkpoint: local open_clip checkpoint of the CLIP tower (OpenAI ViT-L/14); give this
            or `clip_vision_path`.
        clip_vision_path: local ComfyUI clip_vision ViT-L/14 file instead of `clip_checkpoint`.
        clip_arch: open_clip arch of `clip_checkpoint`.
        device: where CLIP and the head live.
        dtype: dtype of their weights.
        clip_vision_state_dict: the weights of a clip_vision ViT-L/14 in that file's key layout
            (``vision_model.*``, ``visual_projection.weight``), instead of a file; they are copied.

    Returns:
        A reward ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` float32 scores on the images'
        device, whose `modules()` are the CLIP tower and the head.
    """
    sources = [s for s in (clip_checkpoint, clip_vision_path, clip_vision_state_dict) if s is not None]
    if len(sources) != 1:
        raise ValueError("give exactly one CLIP source for the aesthetic reward: clip_checkpoint (open_clip "
                         "ViT-L/14 file), clip_vision_path (ComfyUI clip_vision ViT-L/14 file) or "
                         f"clip_vision_state_dict (its weights); got {len(sources)}.")
    # The small head first: a missing or wrong head fails before gigabytes of CLIP are read.
    head = load_aesthetic_head(head_path, device, dtype)
    encoder: ImageEncoder
    if clip_checkpoint is not None:
        encoder = open_clip_image_encoder(load_open_clip(clip_arch, clip_checkpoint, device, dtype)[0])
    elif clip_vision_path is not None:
        encoder = load_comfy_clip_vision(clip_vision_path, device, dtype)
    else:
        encoder = clip_vision_from_state_dict(clip_vision_state_dict, device, dtype,
                                              source="the CLIP_VISION model")
    if encoder.embed_dim != head.layers[0].in_features:
        raise ValueError(f"the CLIP tower gives {encoder.embed_dim}-d embeddings but the aesthetic head "
                         f"takes {head.layers[0].in_features}; the published head needs CLIP ViT-L/14.")

    def reward(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images, prompts)
        # Preprocess in float32 (interpolation precision), then run the towers in their own dtype.
        pixels = clip_preprocess(images.to(device=encoder.device, dtype=torch.float32), encoder.image_size,
                                 encoder.mean, encoder.std).to(encoder.dtype)
        embeds = encoder.embed(pixels)  # (B, 768)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return head(embeds).squeeze(-1).float().to(images.device)

    return FunctionReward(RewardSpec("aesthetic"), reward, modules=[encoder.module, head])
