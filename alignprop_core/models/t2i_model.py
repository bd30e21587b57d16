"""A Stable-Diffusion-1.x-style text-to-image model as plain parts, in the diffusers folder layout.

`T2IModel` holds the four networks AlignProp needs (tokenizer, CLIP text encoder, UNet, VAE) and
the scheduler config; it carries no pipeline logic, so the training loop owns every forward pass.
`load_t2i_model` / `save_t2i_model` read and write the exact layout of
`StableDiffusionPipeline.save_pretrained` (model_index.json, tokenizer/, text_encoder/, unet/, vae/,
scheduler/), so a folder written here also opens in diffusers and a downloaded SD1.5 folder opens
here. Loading never touches the network (`local_files_only=True`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .folders import check_layout

LAYOUT_HINT = ("give a local diffusers-format model directory (with model_index.json, unet/, vae/, "
               "text_encoder/, tokenizer/, scheduler/)")

# The file inside each subfolder whose absence means the subfolder is not usable; checked before
# any weight is read so a wrong path fails in milliseconds with a sentence, not a stack trace.
_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "tokenizer": ("vocab.json", "tokenizer.json"),  # either one is enough
    "text_encoder": ("config.json",),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}


@dataclass
class T2IModel:
    """The parts of an SD1.x-family text-to-image model.

    Attributes:
        tokenizer: CLIP BPE tokenizer; `model_max_length` is the prompt length in tokens.
        text_encoder: CLIP text transformer whose last hidden state conditions the UNet.
        unet: noise predictor eps(x_t, t, text).
        vae: autoencoder mapping latents to RGB images.
        scheduler_config: contents of scheduler/scheduler_config.json (keys DDIMScheduler accepts;
            foreign keys such as PNDM's are kept and ignored by DDIMScheduler.from_config).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the UNet denoises (4 for SD1.5)."""
        return int(self.unet.config.in_channels)

    @property
    def vae_scaling_factor(self) -> float:
        """Factor that brings VAE latents to unit variance (0.18215 for SD1.5)."""
        return float(self.vae.config.scaling_factor)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "T2IModel":
        """Move the three networks in place.

        Args:
            device: target device.
            dtype: target floating dtype, or None to keep each network's dtype.

        Returns:
            self, for chaining.
        """
        # diffusers warns on any `dtype` keyword, even None, so pass it only when asked for.
        kwargs = {} if dtype is None else {"dtype": dtype}
        for net in (self.text_encoder, self.unet, self.vae):
            net.to(device=device, **kwargs)
        return self


def _check_layout(path: Path) -> None:
    """Raise FileNotFoundError naming what is missing, before any weight is loaded."""
    check_layout(path, _REQUIRED_FILES, LAYOUT_HINT)


def load_t2i_model(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> T2IModel:
    """Load a frozen model from a local diffusers-format directory, offline.

    Args:
        path: directory laid out like `StableDiffusionPipeline.save_pretrained` (e.g. SD1.5).
        device: device the networks are moved to.
        dtype: floating dtype of the networks' weights.

    Returns:
        A `T2IModel` whose networks are in eval mode with `requires_grad` False on every parameter.

    Raises:
        FileNotFoundError: the directory or one of its subfolders/config files is missing.
    """
    path = Path(path).expanduser()
    _check_layout(path)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, torch_dtype=dtype)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    # AlignProp trains adapters only; the base networks must never collect gradients.
    for net in (text_encoder, unet, vae):
        net.requires_grad_(False)
        net.eval()
    return T2IModel(tokenizer, text_encoder, unet, vae, scheduler_config).to(device)


def _library_of(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def save_t2i_model(model: T2IModel, path: str | Path) -> None:
    """Write the model in the diffusers layout (safetensors weights plus model_index.json).

    The folder loads with `load_t2i_model` and with `diffusers.StableDiffusionPipeline.from_pretrained`
    (no safety checker or feature extractor is written).

    Args:
        model: the model to write.
        path: target directory; created if missing, existing files of the same names are overwritten.
    """
    import diffusers

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(path / "tokenizer")
    model.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    model.unet.save_pretrained(path / "unet", safe_serialization=True)
    model.vae.save_pretrained(path / "vae", safe_serialization=True)
    scheduler_config = dict(model.scheduler_config)
    scheduler_class = scheduler_config.setdefault("_class_name", "DDIMScheduler")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": [_library_of(model.text_encoder), type(model.text_encoder).__name__],
        "tokenizer": [_library_of(model.tokenizer), type(model.tokenizer).__name__],
        "unet": ["diffusers", type(model.unet).__name__],
        "vae": ["diffusers", type(model.vae).__name__],
    }
    # Written last: its presence marks a complete folder (ensure_tiny_model_dir relies on it).
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


@torch.no_grad()
def encode_prompts(model: T2IModel, prompts: list[str]) -> torch.Tensor:
    """Text conditioning for the UNet, SD1.x style.

    Prompts are padded to `tokenizer.model_max_length` and truncated there; no attention mask is
    passed, as SD1.x was trained that way.

    Args:
        model: the model whose tokenizer and text encoder are used.
        prompts: one string per batch element.

    Returns:
        (B, L, D) last hidden state, on the text encoder's device and dtype.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}; "
                         "wrap a single prompt as [prompt].")
    tok = model.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    return model.text_encoder(ids.to(model.text_encoder.device))[0]


def decode_latents(model: T2IModel, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to RGB images, keeping the autograd graph (rewards backprop through it).

    Args:
        model: the model whose VAE decodes.
        latents: (B, C, h, w) latents in the UNet's scale.

    Returns:
        (B, 3, h * vae_scale_factor, w * vae_scale_factor) images in [0, 1].
    """
    latents = latents.to(device=model.vae.device, dtype=model.vae.dtype)
    images = model.vae.decode(latents / model.vae_scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)
