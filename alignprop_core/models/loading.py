"""One entry point from a local diffusers model folder to a `DiffusionBackend`, for every family.

`load_backend` reads model_index.json's `_class_name` and hands the folder to the family's loader:
StableDiffusionPipeline (SD1.x/SD2.x, `t2i_model`), StableDiffusion3Pipeline (SD3/SD3.5,
`sd3_model`) or FluxPipeline (FLUX.1, `flux_model`). `model_folder_info` reads only JSON configs, so
the CLI and nodes can refuse an unsupported folder or an image size the model cannot take in
milliseconds, before any weight is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .backend import DiffusionBackend, check_image_size
from .folders import read_json

# pipeline class -> (family, what users call it)
SUPPORTED_PIPELINES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("sd15", "SD1.x"),
    "StableDiffusion3Pipeline": ("sd3", "SD3/SD3.5"),
    "FluxPipeline": ("flux", "FLUX.1"),
}
FOLDER_HINT = ("give a local diffusers-format model folder: model_index.json, vae/, scheduler/, the "
               "text encoders and tokenizers, and unet/ (SD1.x) or transformer/ (SD3/SD3.5, FLUX.1)")
# the denoiser's subfolder and its latent cells per token side; FLUX packs 2x2 cells per token
_DENOISER = {"sd15": "unet", "sd3": "transformer", "flux": "transformer"}
_FLUX_PACK = 2


@dataclass(frozen=True)
class ModelFolderInfo:
    """What a model folder's JSON configs say, read without loading any weight."""

    pipeline_class: str  # model_index.json's _class_name, e.g. "FluxPipeline"
    family: str  # "sd15" | "sd3" | "flux"
    vae_scale_factor: int  # image pixels per latent cell
    patch_size: int  # latent cells per model token side (1 for a UNet)
    guidance_input: bool = False  # a guidance-distilled transformer (FLUX.1-dev)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor times patch size)."""
        return self.vae_scale_factor * self.patch_size

    def check_image_size(self, width: int, height: int) -> None:
        """ValueError unless width and height are multiples of `size_multiple`."""
        check_image_size(width, height, self.vae_scale_factor, self.patch_size)


def _unsupported(path: Path, found: object) -> ValueError:
    names = [f"{cls} ({label})" for cls, (_, label) in SUPPORTED_PIPELINES.items()]
    names = ", ".join(names[:-1]) + " and " + names[-1]
    return ValueError(f"{str(path)!r} is a {found} folder; AlignProp's core trains {names} folders. "
                      "Give a folder saved by one of those diffusers pipelines.")


def pipeline_class(path: str | Path) -> str:
    """model_index.json's `_class_name`; ValueError naming the class if no loader supports it.

    Raises:
        FileNotFoundError: no folder at `path`, or no model_index.json in it.
        ValueError: model_index.json is not readable JSON, or names an unsupported pipeline.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"Model directory {str(path)!r} {what}; {FOLDER_HINT}.")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"Model directory {str(path)!r} has no model_index.json; {FOLDER_HINT}.")
    found = read_json(index_file, FOLDER_HINT).get("_class_name")
    if found not in SUPPORTED_PIPELINES:
        raise _unsupported(path, found if isinstance(found, str) else f"{found!r} (no pipeline class)")
    return found


def model_folder_info(path: str | Path) -> ModelFolderInfo:
    """The pipeline class, VAE factor and patch size of a model folder, from its JSON configs only.

    Raises:
        FileNotFoundError: the folder, model_index.json, vae/config.json or the denoiser's
            config.json is missing.
        ValueError: an unsupported pipeline class, or a config that is not readable.
    """
    path = Path(path).expanduser()
    cls = pipeline_class(path)
    family = SUPPORTED_PIPELINES[cls][0]
    denoiser = _DENOISER[family]
    for needed in ("vae/config.json", f"{denoiser}/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"Model directory {str(path)!r} is a {cls} folder without "
                                    f"{needed}; {FOLDER_HINT}.")
    vae = read_json(path / "vae" / "config.json", FOLDER_HINT)
    channels = vae.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError(f"{str(path / 'vae' / 'config.json')!r} has no block_out_channels list; "
                         f"{FOLDER_HINT}.")
    guidance_input = False
    if family == "sd15":
        patch = 1
    elif family == "flux":
        patch = _FLUX_PACK
        config = read_json(path / denoiser / "config.json", FOLDER_HINT)
        guidance_input = bool(config.get("guidance_embeds", False))
    else:
        patch = read_json(path / denoiser / "config.json", FOLDER_HINT).get("patch_size", 2)
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
            raise ValueError(f"{str(path / denoiser / 'config.json')!r} has patch_size={patch!r}, "
                             "not a positive integer.")
    # each VAE block after the first halves the image
    return ModelFolderInfo(cls, family, 2 ** (len(channels) - 1), patch, guidance_input)


def load_backend(path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str | None = None) -> DiffusionBackend:
    """Load the model in a local diffusers folder as a `DiffusionBackend`, frozen and offline.

    Args:
        path: a folder saved by StableDiffusionPipeline, StableDiffusion3Pipeline or FluxPipeline.
        device: device the networks are moved to.
        dtype: floating dtype of the networks' weights.
        name: recorded in LoRA metadata; defaults to the folder's name.

    Returns:
        The family's backend (arch "sd15", "sd3" or "flux").

    Raises:
        FileNotFoundError / ValueError: as `pipeline_class` and the family's loader, before any
            weight is read.
    """
    path = Path(path).expanduser()
    cls = pipeline_class(path)
    name = name or path.name
    family = SUPPORTED_PIPELINES[cls][0]
    if family == "sd15":
        from .backend import diffusers_backend
        from .t2i_model import load_t2i_model

        return diffusers_backend(load_t2i_model(path, device=device, dtype=dtype), name=name)
    if family == "sd3":
        from .sd3_model import load_sd3_model, sd3_backend

        return sd3_backend(load_sd3_model(path, device=device, dtype=dtype), name=name)
    if family == "flux":
        from .flux_model import flux_backend, load_flux_model

        return flux_backend(load_flux_model(path, device=device, dtype=dtype), name=name)
    raise AssertionError(f"family {family!r} of {cls} has no loader")
