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


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; give a text file with one prompt "
                                "per line.")
    return parse_prompts(path.read_text(encoding="utf-8"), source=f"prompt file {path}")


def shipped_prompts(name: str) -> list[str]:
    """A prompt list shipped with the package: 'animals' (training) or 'animals_eval' (held out)."""
    available = sorted(p.name[:-4] for p in resources.files("alignprop_core.data").iterdir()
                       if p.name.endswith(".txt"))
    if name not in available:
        raise ValueError(f"no shipped prompt list {name!r}; available: {', '.join(available)}.")
    text = resources.files("alignprop_core.data").joinpath(name + ".txt").read_text(encoding="utf-8")
    return parse_prompts(text, source=f"shipped list {name}")
