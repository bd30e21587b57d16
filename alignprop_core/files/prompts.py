"""Prompt lists: reading a user's prompt file and the lists shipped in `alignprop_core/data/`."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def parse_prompts(text: str, source: str = "prompt text") -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{source} holds no prompts; write one prompt per line.")
    return prompts


def read_prompts(path: str | Path, what: str = "prompt file") -> list[str]:
    """Prompts from a UTF-8 text file, one per line; errors name `what` (e.g. "--prompts file")."""
    path = Path(path)
    hint = "give a text file with one prompt per line."
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drops the BOM some editors write
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                         f"offset {err.start}); save it as UTF-8.") from err
    except OSError as err:
        raise OSError(f"{what} {path} cannot be read ({err.strerror or err}); {hint}") from err
    return parse_prompts(text, source=f"{what} {path}")


def shipped_prompts(name: str) -> list[str]:
    """A prompt list shipped with the package: 'animals' (training) or 'animals_eval' (held out)."""
    available = sorted(p.name[:-4] for p in resources.files("alignprop_core.data").iterdir()
                       if p.name.endswith(".txt"))
    if name not in available:
        raise ValueError(f"no shipped prompt list {name!r}; available: {', '.join(available)}.")
    text = resources.files("alignprop_core.data").joinpath(name + ".txt").read_text(encoding="utf-8")
    return parse_prompts(text, source=f"shipped list {name}")
