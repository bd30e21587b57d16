"""The models the benchmarks run on, all built locally from configs with seeded random weights.

* ``tiny``: `alignprop_core.models.tiny_model` (32 px images, 16x16 latents).
* ``small``: an SD-shaped model a few times larger (three UNet levels, two with cross-attention,
  64-wide text encoder of 4 layers, VAE factor 4); 64 px images by default.
* ``sd15``: the full Stable Diffusion 1.5 architecture (UNet 860M, CLIP ViT-L text encoder, VAE
  factor 8) from its standard config, random weights, nothing downloaded.
* ``tiny-sd3``, ``tiny-flux``: the tiny random SD3.5-like and FLUX.1-dev-like folders of
  `alignprop_core.models.tiny_flow_models` (32 px images), written once into `FOLDER_CACHE`.
* any other name is a path to a local diffusers-format folder (e.g. the pretrained toy world); SD3
  and FLUX.1 folders run through `build_backend`.

`model_folder` writes a model as a diffusers folder (for the reference implementations, which load
pipelines from disk) and caches it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from alignprop_core.models.backend import DiffusionBackend, diffusers_backend
from alignprop_core.models.loading import load_backend
from alignprop_core.models.t2i_model import T2IModel, load_t2i_model, save_t2i_model
from alignprop_core.models.tiny_model import TINY_SCHEDULER_CONFIG, build_tiny_model, build_tiny_tokenizer

BUILTIN = ("tiny", "small", "sd15")
FLOW_BUILTIN = ("tiny-sd3", "tiny-flux")
FOLDER_CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its name and its natural image size."""

    name: str
    default_px: int


def default_px(name: str) -> int:
    """Image size the benchmarks use for a model when none is given (a folder: its UNet's native size)."""
    if name in BUILTIN + FLOW_BUILTIN:
        return {"tiny": 32, "small": 64, "sd15": 64, "tiny-sd3": 32, "tiny-flux": 32}[name]
    folder = Path(name).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError):
        return 32


def _frozen(model: T2IModel) -> T2IModel:
    for net in (model.text_encoder, model.unet, model.vae):
        net.requires_grad_(False)
        net.eval()
    return model


def build_small_model(seed: int = 0) -> T2IModel:
    """An SD-shaped model between tiny and SD1.5 (UNet ~6M parameters)."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, projection_dim=64,
            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=16, sample_size=64, scaling_factor=0.18215)
    # three VAE levels give factor 4: 64 px images, 16x16 latents
    return _frozen(T2IModel(tokenizer, text_encoder, unet, vae, dict(TINY_SCHEDULER_CONFIG)))


def build_sd15_model(seed: int = 0) -> T2IModel:
    """The SD1.5 architecture (standard v1-5 configs), random weights; a local tokenizer of 77 tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, projection_dim=768,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    return _frozen(T2IModel(tokenizer, text_encoder, unet, vae, dict(TINY_SCHEDULER_CONFIG)))


def build_model(name: str, seed: int = 0) -> T2IModel:
    """A builtin model by name, or a diffusers folder by path."""
    if name == "tiny":
        return build_tiny_model(seed)
    if name == "small":
        return build_small_model(seed)
    if name == "sd15":
        return build_sd15_model(seed)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {name!r} is neither one of {', '.join(BUILTIN)} nor a diffusers folder.")
    return load_t2i_model(path)


def model_folder(name: str, cache: Path, seed: int = 0) -> Path:
    """A diffusers folder holding the model (built and written once into `cache`)."""
    if name not in BUILTIN:
        return Path(name).expanduser()
    folder = cache / f"{name}-seed{seed}"
    if not (folder / "model_index.json").is_file():
        save_t2i_model(build_model(name, seed), folder)
    return folder


def flow_folder(name: str, seed: int = 0) -> Path:
    """The folder of a builtin flow model (`FLOW_BUILTIN`), written on first use."""
    from alignprop_core.models.tiny_flow_models import ensure_tiny_flux_dir, ensure_tiny_sd3_dir

    ensure = {"tiny-sd3": ensure_tiny_sd3_dir, "tiny-flux": ensure_tiny_flux_dir}[name]
    return ensure(FOLDER_CACHE / f"{name}-seed{seed}", seed=seed)


def build_backend(name: str, seed: int = 0) -> DiffusionBackend:
    """A backend for any benchmark model: builtin (SD1.x-style or flow) or a folder of any family."""
    if name in FLOW_BUILTIN:
        return load_backend(flow_folder(name, seed), name=name)
    if name not in BUILTIN and Path(name).expanduser().is_dir():
        return load_backend(Path(name).expanduser(), name=name)
    return diffusers_backend(build_model(name, seed), name=name)
