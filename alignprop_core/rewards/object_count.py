"""Differentiable object-count reward from an open-vocabulary detector (OWL-ViT or OWLv2).

The detector scores every image patch as a box for a text query ("a photo of a cat"). A soft count
sums the per-box probabilities, softly thresholded around the post-processing threshold (0.1 in
transformers' `post_process_object_detection`):

    count = sum_i sigmoid((logit_i - logit(threshold)) / temperature)
    reward = -|count - target|

With threshold=None and temperature=1 the count is the plain expected count sum_i sigmoid(logit_i).
OWL detectors predict one box per patch and post-processing applies no NMS, so one object can give
several confident boxes: like `post_process_object_detection`, this counts confident boxes.
The image preprocessing re-implements the model's image processor with differentiable torch ops, so
gradients reach the pixels. Detectors: OWL-ViT (Minderer et al. 2022, "Simple Open-Vocabulary Object
Detection with Vision Transformers") and OWLv2 (Minderer et al. 2023, "Scaling Open-Vocabulary Object
Detection"), loaded from a LOCAL transformers folder only.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Reward, check_images
from .clip_loading import quiet_pickle_protocol_warning, weights_error
from .spec import RewardSpec

DEFAULT_QUERY = "a photo of a {}"
# OWLv2 was trained on images padded with grey (the original implementation and transformers 4.x
# pad with 0.5; transformers 5.x pads with 0.0). Generated images are square, so this rarely matters.
OWLV2_PAD_VALUE = 0.5
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Hub checkpoints ship preprocessor_config.json; transformers 5 save_pretrained nests the same
# settings under "image_processor" in processor_config.json.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_SOURCE_HINT = ("download a transformers OWL-ViT/OWLv2 folder such as google/owlvit-base-patch32 or "
                "google/owlv2-base-patch16-ensemble from the Hugging Face Hub (about 0.6 GB for the base "
                "models, 1.7 GB for the large ones) and pass the folder holding config.json")
_WORD_RE = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*")


@dataclass(frozen=True)
class DetectorPreprocess:
    """How the detector's image processor turns [0, 1] RGB into pixel_values."""

    kind: str  # "owlvit" (bicubic resize) or "owlv2" (pad to square, blur, bilinear resize)
    height: int  # output height in pixels
    width: int  # output width in pixels
    mean: tuple[float, float, float]  # per-channel normalisation mean (on [0, 1] values)
    std: tuple[float, float, float]  # per-channel normalisation std (on [0, 1] values)
    pad_value: float = OWLV2_PAD_VALUE  # OWLv2 only: fill of the bottom/right square padding


def preprocess_images(images: torch.Tensor, spec: DetectorPreprocess) -> torch.Tensor:
    """Differentiable twin of `OwlViTImageProcessor` / `Owlv2ImageProcessor` (torchvision backend).

    Args:
        images: (B, 3, H, W) float RGB in [0, 1].
        spec: sizes and normalisation read from the image processor settings.

    Returns:
        (B, 3, spec.height, spec.width) float32 pixel_values.
    """
    x = images.float()
    if spec.kind == "owlvit":
        # torchvision resizes uint8 images (the usual PIL input) on CPU with the antialiased bicubic
        # kernel in two passes, width then height, clamping each pass to the uint8 range. Doing the
        # same keeps the bicubic overshoot clamped exactly as in the processor (to ~1/255).
        if x.shape[-1] != spec.width:
            x = F.interpolate(x, size=(x.shape[-2], spec.width), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        if x.shape[-2] != spec.height:
            x = F.interpolate(x, size=(spec.height, spec.width), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
    elif spec.kind == "owlv2":
        h, w = x.shape[-2:]
        side = max(h, w)
        x = F.pad(x, (0, side - w, 0, side - h), value=spec.pad_value)
        x = _owlv2_resize(x, spec.height, spec.width)
    else:
        raise ValueError(f"unknown detector kind {spec.kind!r}; expected 'owlvit' or 'owlv2'.")
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _owlv2_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gaussian anti-aliasing (skimage style, sigma = (factor - 1) / 2) then plain bilinear resize."""
    sigmas = [max(0.0, (x.shape[-2] / height - 1) / 2), max(0.0, (x.shape[-1] / width - 1) / 2)]
    # The processor skips the blur entirely as soon as one axis is not downsampled.
    if min(sigmas) > 0:
        x = _gaussian_blur(x, sigmas[0], dim=-2)
        x = _gaussian_blur(x, sigmas[1], dim=-1)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """1-D Gaussian along `dim` (-2 rows, -1 columns), kernel 2*ceil(3 sigma)+1, reflect padding."""
    size = 2 * math.ceil(3 * sigma) + 1
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    if dim == -1:
        weight = kernel.view(1, 1, 1, size).expand(channels, 1, 1, size)
        x = F.pad(x, (size // 2, size // 2, 0, 0), mode="reflect")
    else:
        weight = kernel.view(1, 1, size, 1).expand(channels, 1, size, 1)
        x = F.pad(x, (0, 0, size // 2, size // 2), mode="reflect")
    return F.conv2d(x, weight, groups=channels)


def soft_count(logits: torch.Tensor, threshold: float | None, temperature: float) -> torch.Tensor:
    """Sum over boxes (and queries) of sigmoid((logit - logit(threshold)) / temperature).

    Args:
        logits: (B, num_boxes, num_queries) class logits of the detector.
        threshold: box probability at which a box counts one half; None centres at logit 0.
        temperature: logit-space width of the soft step; smaller is closer to a hard threshold.

    Returns:
        (B,) float32 soft counts.
    """
    offset = 0.0 if threshold is None else math.log(threshold / (1 - threshold))
    return torch.sigmoid((logits.float() - offset) / temperature).sum(dim=(1, 2))


def object_from_prompt(prompt: str) -> str:
    """The prompt's last word, lower-cased: "three red apples." -> "apples"."""
    words = _WORD_RE.findall(prompt)
    if not words:
        raise ValueError(f"object_name is None, so the object is the prompt's last word, but prompt "
                         f"{prompt!r} has no word; give object_name explicitly.")
    return words[-1].lower()


class ObjectCountReward(Reward):
    """Callable reward `(images, prompts) -> Tensor[B]`; built by `make_object_count`."""

    def __init__(self, model, tokenizer, spec: DetectorPreprocess, object_name: str | None,
                 target: float, threshold: float | None, temperature: float, query_template: str,
                 max_length: int):
        super().__init__(RewardSpec("object_count"))
        self.model, self.tokenizer, self.preprocess = model, tokenizer, spec
        self.object_name, self.target = object_name, target
        self.threshold, self.temperature = threshold, temperature
        self.query_template, self.max_length = query_template, max_length

    def queries(self, prompts: Sequence[str], batch: int) -> list[str]:
        """One detector text query per image."""
        if self.object_name is not None:
            return [self.query_template.format(self.object_name)] * batch
        return [self.query_template.format(object_from_prompt(p)) for p in prompts]

    def count(self, pixel_values: torch.Tensor, queries: Sequence[str]) -> torch.Tensor:
        """Soft count for already preprocessed pixel_values (B, 3, h, w) and one query per image."""
        param = next(self.model.parameters())
        # Same tokenisation as OwlViTProcessor: padded to the text model's 16 positions.
        tokens = self.tokenizer(list(queries), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt").to(param.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         pixel_values=pixel_values.to(param.device, param.dtype))
        return soft_count(out.logits, self.threshold, self.temperature)  # (B,)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        queries = self.queries(prompts, images.shape[0])
        counts = self.count(preprocess_images(images, self.preprocess), queries)
        return -(counts - self.target).abs().to(images.device, torch.float32)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r} ({err}); re-download it or {_SOURCE_HINT}.") from err


def _check_detector_dir(path: Path) -> dict:
    """Raise FileNotFoundError naming what is missing; return config.json's contents."""
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"object-count detector folder {str(path)!r} {what}; {_SOURCE_HINT}.")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in _PROCESSOR_FILES):
        missing.append(" or ".join(_PROCESSOR_FILES) + " (the image processor settings)")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES) + " (the weights)")
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        missing.append("tokenizer.json or vocab.json + merges.txt (the tokenizer)")
    if missing:
        raise FileNotFoundError(f"object-count detector folder {str(path)!r} is incomplete: missing "
                                f"{', '.join(missing)}; {_SOURCE_HINT}.")
    return _read_json(path / "config.json")


def _size_hw(size, path: Path) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"{str(path)!r}: unsupported 'size' {size!r}; expected an int or "
                     "{'height': H, 'width': W}.")


def load_preprocess_spec(path: str | Path, kind: str, image_size: int) -> DetectorPreprocess:
    """Read the image processor settings and check they match the vision tower's `image_size`."""
    path = Path(path) / _PROCESSOR_FILES[0]
    if path.is_file():
        cfg = _read_json(path)
    else:
        path = path.with_name(_PROCESSOR_FILES[1])
        cfg = _read_json(path).get("image_processor", {})
    height, width = _size_hw(cfg.get("size", image_size), path)
    # A centre crop to the resized size is a no-op; any other crop is not reproduced here.
    cropping = cfg.get("do_center_crop") and _size_hw(cfg.get("crop_size", height), path) != (height, width)
    if cropping or cfg.get("do_resize") is False:
        raise ValueError(f"{str(path)!r} centre-crops or does not resize, which the object-count "
                         "reward does not reproduce; use the processor settings shipped with the "
                         "checkpoint.")
    if (height, width) != (image_size, image_size):
        raise ValueError(f"{str(path)!r} resizes to {height}x{width} but the model's "
                         f"vision_config.image_size is {image_size}; the two files come from "
                         "different checkpoints.")
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return DetectorPreprocess(kind=kind, height=height, width=width,
                              mean=tuple(float(v) for v in cfg.get("image_mean", clip_mean)),
                              std=tuple(float(v) for v in cfg.get("image_std", clip_std)))


def make_object_count(model_dir: str | Path, object_name: str | None, target: float,
                      threshold: float | None = 0.1, temperature: float = 0.25, device="cpu",
                      dtype: torch.dtype = torch.float32,
                      query_template: str = DEFAULT_QUERY) -> ObjectCountReward:
    """Reward = -|soft count of `object_name` - target|, from a local OWL-ViT/OWLv2 folder.

    Args:
        model_dir: local transformers folder (config.json with model_type "owlvit" or "owlv2",
            preprocessor_config.json or processor_config.json, weights, tokenizer), e.g. a copy of
            google/owlvit-base-patch32.
        object_name: what to count ("cat"). None takes, per image, the prompt's last word
            ("a photo of three cats" -> "cats"), lower-cased.
        target: desired number of objects (>= 0).
        threshold: box probability counted as one half (the post-processing default is 0.1);
            None centres the soft step at probability 0.5.
        temperature: logit-space width of the soft step (> 0). 0.25 counts p=0.05 as ~0.05 and
            p=0.3 as ~1; threshold=None with temperature=1 gives the expected count sum sigmoid(logit).
        device: where the detector runs.
        dtype: detector weight dtype (preprocessing stays float32).
        query_template: text query with one "{}" for the object name.

    Returns:
        An `ObjectCountReward`: `fn(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: bad object_name, target, threshold, temperature or template.
    """
    # 1. Validate the cheap arguments before touching the disk.
    if object_name is not None and not str(object_name).strip():
        raise ValueError("object_name is empty; give the object to count (e.g. 'cat'), or None to "
                         "use each prompt's last word.")
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target must be a finite number of objects >= 0; got {target}.")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1) or None; got {threshold}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if query_template.count("{}") != 1:
        raise ValueError(f"query_template must contain exactly one '{{}}' for the object name; "
                         f"got {query_template!r}.")

    # 2. Check the folder, then pick the architecture from config.json.
    path = Path(model_dir).expanduser()
    config = _check_detector_dir(path)
    from transformers import AutoTokenizer, Owlv2ForObjectDetection, OwlViTForObjectDetection

    kind = config.get("model_type")
    if kind == "owlvit":
        model_cls = OwlViTForObjectDetection
    elif kind == "owlv2":
        model_cls = Owlv2ForObjectDetection
    else:
        raise ValueError(f"{str(path / 'config.json')!r} has model_type {kind!r}; the object-count "
                         f"reward needs 'owlvit' or 'owlv2'; {_SOURCE_HINT}.")
    image_size = int(config.get("vision_config", {}).get("image_size", 768 if kind == "owlvit" else 960))
    spec = load_preprocess_spec(path, kind, image_size)

    # 3. Load frozen weights; dtype is applied after loading so transformers 4.x and 5.x agree.
    try:
        with quiet_pickle_protocol_warning():
            model = model_cls.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - torch, safetensors and transformers each raise their own
        raise weights_error(path, _WEIGHT_FILES, err, _SOURCE_HINT) from err
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    max_length = int(config.get("text_config", {}).get("max_position_embeddings", 16))
    name = None if object_name is None else str(object_name).strip()
    return ObjectCountReward(model, tokenizer, spec, name, float(target), threshold,
                             float(temperature), query_template, max_length)
