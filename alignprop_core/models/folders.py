"""Reading diffusers model folders: layout checks before any weight is read, and loading one frozen part.

Every loader (SD1.x, SD3/SD3.5, FLUX.1) checks that the subfolders and config files it needs exist
first, so a wrong path fails in milliseconds with a sentence naming what is missing, then loads each
network offline (`local_files_only=True`), in eval mode with `requires_grad` False: AlignProp trains
adapters only, and the base networks must never collect gradients.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


def check_layout(path: Path, required: Mapping[str, tuple[str, ...]], hint: str) -> None:
    """FileNotFoundError naming what is missing, before any weight is loaded.

    Args:
        path: the model folder.
        required: subfolder -> files of which at least one must exist in it (e.g. a tokenizer may
            have vocab.json or tokenizer.json).
        hint: what to give instead, appended to every message.
    """
    if not path.exists():
        raise FileNotFoundError(f"Model directory {str(path)!r} does not exist; {hint}.")
    if not path.is_dir():
        raise FileNotFoundError(f"Model path {str(path)!r} is a file, not a directory (single-file "
                                f"checkpoints are not supported); {hint}.")
    missing_dirs = [name for name in required if not (path / name).is_dir()]
    if missing_dirs:
        raise FileNotFoundError(
            f"Model directory {str(path)!r} lacks subfolder(s) {', '.join(d + '/' for d in missing_dirs)}; "
            f"{hint}.")
    missing_files = [f"{name}/{files[0]}" for name, files in required.items()
                     if not any((path / name / f).is_file() for f in files)]
    if missing_files:
        raise FileNotFoundError(
            f"Model directory {str(path)!r} is incomplete: missing {', '.join(missing_files)}; {hint}.")


def read_json(file: Path, hint: str) -> dict[str, Any]:
    """A JSON object from `file`; ValueError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(file)!r} cannot be read as JSON ({type(err).__name__}: {err}); "
                         f"{hint}.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {type(data).__name__}, not an object; {hint}.")
    return data


def freeze(*nets: nn.Module | None) -> None:
    """Eval mode and no gradient on every parameter (None entries, absent parts, are skipped)."""
    for net in nets:
        if net is not None:
            net.requires_grad_(False)
            net.eval()


def load_part(cls: type, folder: Path, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """One network of a model folder, offline, frozen, in `dtype` on `device`.

    diffusers' `from_pretrained` takes `torch_dtype`, transformers' (since 4.56) `dtype`; both are
    handled here so the loaders do not repeat it.
    """
    if cls.__module__.startswith("diffusers"):
        net = cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    else:
        net = cls.from_pretrained(folder, local_files_only=True, dtype=dtype)
    freeze(net)
    return net.to(device)
