"""Differentiable CLIP image preprocessing: resize, crop (or pad), normalise, all in torch ops.

Reference pipelines reproduced (evaluation transforms, not training augmentation):

* OpenAI CLIP / open_clip ``image_transform(size, is_train=False)`` and the LAION aesthetic predictor:
  PIL bicubic resize of the shortest side to ``size``, ``CenterCrop(size)`` (torchvision offsets,
  ``round((H - size) / 2)``), ``ToTensor``, ``Normalize(mean, std)``.
* transformers ``CLIPImageProcessor`` (PickScore): the same, except the crop offset is floored,
  ``(H - size) // 2``; choose it with ``crop_offset="floor"``.
* HPSv2's ``preprocess_val`` (``resize_longest_max=True``): ``ToTensor`` first, then the float tensor's
  longest side is resized to ``size`` and the short side zero-padded to a square; no uint8 rounding,
  no clipping (``resize_mode="longest", clamp=False``).

PIL resamples with a bicubic kernel (a = -0.5) whose support widens when downscaling (antialiasing);
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` implements the same filter, so
the only differences left against PIL are its 8-bit rounding of the resized image (at most 0.5/255
per pixel in [0, 1] units) and PIL's fixed-point filter weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# The statistics of OpenAI's CLIP training set, used by OpenAI CLIP, open_clip's LAION models,
# HPSv2, PickScore and the LAION aesthetic predictor alike.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest")
CROP_OFFSETS = ("round", "floor")


def _resize(images: torch.Tensor, size_hw: tuple[int, int], clamp: bool) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size_hw:
        # PIL's Image.resize and torchvision return the input unchanged at the same size.
        return images
    if not clamp:
        return F.interpolate(images, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
    # PIL resamples horizontally into a uint8 image, then vertically, so the overshoot of the first
    # pass is clipped before the second; two clamped passes reproduce that (a bicubic kernel at
    # scale 1 is the identity, so each call only resamples one axis).
    out = images
    if images.shape[-1] != size_hw[1]:
        out = F.interpolate(out, size=(out.shape[-2], size_hw[1]), mode="bicubic",
                            align_corners=False, antialias=True).clamp(0.0, 1.0)
    if out.shape[-2] != size_hw[0]:
        out = F.interpolate(out, size=size_hw, mode="bicubic",
                            align_corners=False, antialias=True).clamp(0.0, 1.0)
    return out


def _crop_start(excess: int, crop_offset: str) -> int:
    if crop_offset == "round":
        return int(round(excess / 2.0))  # torchvision.transforms.functional.center_crop
    elif crop_offset == "floor":
        return excess // 2  # transformers.image_transforms.center_crop
    else:
        raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}; got {crop_offset!r}.")


def clip_preprocess(images: torch.Tensor, size: int = 224,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    resize_mode: str = "shortest", crop_offset: str = "round",
                    clamp: bool = True) -> torch.Tensor:
    """Turn [0, 1] images into the normalised, square CLIP input, differentiably.

    Args:
        images: (B, 3, H, W) floating-point images in [0, 1], any H and W.
        size: side of the square model input in pixels (224 for ViT-L/14 and ViT-H/14).
        mean: per-channel mean subtracted after resizing, in [0, 1] units.
        std: per-channel standard deviation divided out after subtracting the mean.
        resize_mode: "shortest" resizes the shortest side to `size` and centre-crops the other
            (OpenAI CLIP, open_clip, transformers); "longest" resizes the longest side to `size` and
            zero-pads the other, centred (HPSv2).
        crop_offset: how the centre crop rounds an odd margin: "round" as torchvision (open_clip,
            OpenAI CLIP) or "floor" as transformers' CLIPImageProcessor. Unused for "longest".
        clamp: clip the resized image to [0, 1] as a uint8 PIL pipeline does; HPSv2 resizes a float
            tensor and does not clip.

    Returns:
        (B, 3, size, size) normalised images, same dtype and device as `images`.
    """
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess takes float images of shape (B, 3, H, W); "
                         f"got {images.dtype} {tuple(images.shape)}.")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (the square CLIP input side); got {size!r}.")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 channels with std > 0; got mean={mean}, std={std}.")
    h, w = images.shape[-2:]

    if resize_mode == "shortest":
        short, long = min(h, w), max(h, w)
        # int() truncation is what torchvision and transformers use for the long side.
        new_long = int(size * long / short)
        new_hw = (size, new_long) if h <= w else (new_long, size)
        x = _resize(images, new_hw, clamp)  # (B, 3, new_h, new_w), shortest side == size
        top = _crop_start(new_hw[0] - size, crop_offset)
        left = _crop_start(new_hw[1] - size, crop_offset)
        x = x[..., top:top + size, left:left + size]
    elif resize_mode == "longest":
        scale = size / max(h, w)
        new_hw = (round(h * scale), round(w * scale))
        x = _resize(images, new_hw, clamp)  # (B, 3, new_h, new_w), longest side == size
        pad_h, pad_w = size - new_hw[0], size - new_hw[1]
        # Black (0 before normalisation) borders, the larger half after the image, as HPSv2 pads.
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}; got {resize_mode!r}.")

    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
