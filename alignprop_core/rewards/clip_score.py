"""CLIP score reward: cosine similarity of an image's and its prompt's CLIP embeddings.

The CLIPScore of Hessel et al. 2021 without its 2.5 * max(cos, 0) rescaling (a constant factor and a
clip that would zero the gradient of mismatched pairs); any open_clip ViT checkpoint on disk works.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .base import FunctionReward, check_images, check_prompts
from .clip_loading import load_open_clip, open_clip_image_encoder
from .preprocess import clip_preprocess
from .spec import RewardSpec


def open_clip_similarity(model: torch.nn.Module, tokenizer: Callable, resize_mode: str = "shortest",
                         clamp: bool = True) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``(images in [0, 1], prompts) -> cos(image_emb_i, text_emb_i)`` for a frozen open_clip model.

    Args:
        model: frozen open_clip CLIP model.
        tokenizer: its open_clip tokenizer.
        resize_mode, clamp: preprocessing options of `clip_preprocess` ("longest", False for HPSv2).

    Returns:
        A function returning (B,) float32 cosines on the model's device, differentiable w.r.t. images.
    """
    encoder = open_clip_image_encoder(model)

    def similarity(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(device=encoder.device, dtype=torch.float32), encoder.image_size,
                                 encoder.mean, encoder.std, resize_mode=resize_mode, clamp=clamp)
        image_emb = model.encode_image(pixels.to(encoder.dtype), normalize=True)  # (B, D)
        with torch.no_grad():  # no gradient reaches the text: skip storing its activations
            tokens = tokenizer(prompts).to(encoder.device)  # (B, context_length)
            text_emb = model.encode_text(tokens, normalize=True)  # (B, D)
        return (image_emb * text_emb).sum(dim=-1).float()

    return similarity


def make_clip_score(arch: str, checkpoint: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> FunctionReward:
    """Cosine similarity between normalised CLIP image and prompt embeddings, in [-1, 1].

    Args:
        arch: open_clip arch of `checkpoint`, e.g. "ViT-L-14-quickgelu" for OpenAI ViT-L/14.
        checkpoint: local open_clip checkpoint file.
        device: where the frozen CLIP lives.
        dtype: dtype of its weights.

    Returns:
        A reward ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` float32 scores on the images'
        device, whose `modules()` is the frozen model.
    """
    model, tokenizer = load_open_clip(arch, checkpoint, device, dtype)
    similarity = open_clip_similarity(model, tokenizer)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        return similarity(images, check_prompts(prompts, "clip_score")).to(images.device)

    return FunctionReward(RewardSpec("clip_score"), reward, modules=[model])
