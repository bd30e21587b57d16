"""Human Preference Score v2 / v2.1 reward (Wu et al. 2023, "Human Preference Score v2").

Reproduces tgxs002/HPSv2 ``hpsv2/img_score.py``: an open_clip ViT-H-14 whose weights are replaced by
the HPS checkpoint (``{"state_dict": ...}``), score = image_features . text_features with both
L2-normalised by the model (no logit scale), i.e. a cosine of about 0.2-0.3 for typical images.
Its ``preprocess_val`` (``resize_longest_max=True``) turns the image into a float tensor, resizes
the longest side to 224 and zero-pads the rest; for square images that is a plain resize.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import FunctionReward, check_images, check_prompts
from .clip_loading import load_open_clip, require_file
from .clip_score import open_clip_similarity
from .spec import RewardSpec


def make_hps(checkpoint: str | Path, arch: str = "ViT-H-14", device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> FunctionReward:
    """HPSv2 score of each image for its prompt (higher is more preferred by people).

    Args:
        checkpoint: local ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``.
        arch: open_clip arch the checkpoint was trained on (ViT-H-14 for both releases).
        device: where the frozen model lives.
        dtype: dtype of its weights.

    Returns:
        A reward ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` float32 scores on the images'
        device, whose `modules()` is the frozen model.
    """
    path = require_file(checkpoint, "HPSv2 checkpoint", "HPS_v2.1_compressed.pt or HPS_v2_compressed.pt",
                        "1.7 GB", "huggingface.co/xswu/HPSv2")
    model, tokenizer = load_open_clip(arch, path, device, dtype)
    # The reference resizes a float tensor: longest side, zero padding, no [0, 1] clipping.
    similarity = open_clip_similarity(model, tokenizer, resize_mode="longest", clamp=False)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        return similarity(images, check_prompts(prompts, "hps")).to(images.device)

    return FunctionReward(RewardSpec("hps"), reward, modules=[model])
