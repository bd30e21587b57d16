"""A small CNN that reads a toy-world image: how many shapes, which colour, which shape, which background.

It is the toy world's analogue of the paper's object-count detector: trained by the project on the
shape generator (`pretrain.py`), differentiable end to end, and small enough to commit (0.86 MB).
Global average pooling over the last feature map makes the count head a learned density sum.
Weights are stored as safetensors with the architecture in the file's metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .shapes import BACKGROUND_NAMES, COLOUR_NAMES, MAX_COUNT, SHAPES

HEADS: dict[str, int] = {"count": MAX_COUNT, "colour": len(COLOUR_NAMES), "shape": len(SHAPES),
                         "background": len(BACKGROUND_NAMES)}
WEIGHTS_FILE = "classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """Widths of the classifier (the defaults are the committed one's)."""

    channels: tuple[int, ...] = (32, 64, 96)  # one stride-2 stage each after the stem
    image_size: int = 32  # inputs of another size are resized to this


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ShapeClassifier(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> dict of logits per head (count, colour, shape, background)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [_block(3, config.channels[0], 1)], config.channels[0]
        for c in config.channels:
            layers += [_block(c_in, c, 2), _block(c, c, 1)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, sum(HEADS.values()))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        x = self.features(images * 2 - 1).mean(dim=(2, 3))
        return dict(zip(HEADS, self.head(x).split(list(HEADS.values()), dim=1)))


def save_classifier(model: ShapeClassifier, path: str | Path, info: dict | None = None) -> Path:
    """Write the weights (fp32 safetensors) with the config and `info` in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(asdict(model.config)), "info": json.dumps(info or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path),
              metadata=meta)
    return path


def default_weights_path() -> Path:
    """The committed classifier, shipped inside the package next to the toy model."""
    return Path(str(resources.files("alignprop_core.data").joinpath("toy_world", WEIGHTS_FILE)))


def load_classifier(path: str | Path | None = None) -> ShapeClassifier:
    """A frozen (eval, no grad) classifier from `path` (default: the committed one)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"toy classifier weights {path} do not exist; run "
                                "`python -m alignprop_core.toy.pretrain` to train them.")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    raw = json.loads(meta.get("config", "{}"))
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    model = ShapeClassifier(config)
    model.load_state_dict(load_file(str(path)))
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def accuracy(model: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> dict[str, float]:
    """Per-head accuracy on images (N, 3, H, W) with labels (N, 4) in HEADS order."""
    hits = torch.zeros(len(HEADS))
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        preds = torch.stack([logits[h].argmax(1) for h in HEADS], dim=1)
        hits += (preds == labels[i:i + batch_size]).float().sum(0)
    return {h: float(hits[j]) / len(images) for j, h in enumerate(HEADS)}
