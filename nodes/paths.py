"""Model folders and safe file names: where reward weights are found and LoRAs are written.

A file name typed into a node never escapes its ComfyUI folder: absolute paths, drive letters and
`..` are refused before anything is opened or written.
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from alignprop_core.files.outputs import check_file_name

REWARD_FOLDER = "reward_models"
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin"}


def register_reward_folder() -> None:
    """Add models/reward_models without clobbering an entry from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, REWARD_FOLDER)
    if REWARD_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[REWARD_FOLDER]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths[REWARD_FOLDER] = ([default], set(WEIGHT_EXTENSIONS))
    os.makedirs(default, exist_ok=True)


def weight_files(folder: str = REWARD_FOLDER) -> list[str]:
    """Weight files of a model folder, for a dropdown."""
    return [f for f in folder_paths.get_filename_list(folder) if Path(f).suffix in WEIGHT_EXTENSIONS]


def model_dirs(folder: str = REWARD_FOLDER) -> list[str]:
    """Sub-folders holding a transformers model (config.json), for a dropdown."""
    found = []
    for root in folder_paths.get_folder_paths(folder):
        if os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, entry, "config.json")):
                    found.append(entry)
    return found


def existing_path(folder: str, name: str) -> str:
    """Full path of a file or model folder chosen in a dropdown; FileNotFoundError naming the folder."""
    _check_relative(name, f"the {folder} folder")
    for root in folder_paths.get_folder_paths(folder):
        candidate = _inside(root, name)
        if os.path.exists(candidate):
            return candidate
    roots = ", ".join(folder_paths.get_folder_paths(folder))
    raise FileNotFoundError(f"{name!r} was not found in the {folder} folder ({roots}); put the file there "
                            "and refresh the page.")


def output_path(folder: str, name: str, suffix: str = ".safetensors", what: str = "the file name") -> str:
    """Where to write `name` inside the first path of `folder`; refuses names that leave it. Nothing is
    created here."""
    _check_relative(name, f"the {folder} folder", what)
    if not name.endswith(suffix):
        name += suffix
    root = folder_paths.get_folder_paths(folder)[0]
    return _inside(root, name)  # the writer makes the folders, once everything else is checked


def join_inside(root: str, name: str) -> str:
    """`root`/`name` for a name typed into a node; refuses names that would leave `root`."""
    _check_relative(name, root)
    return _inside(root, name)


def _check_relative(name: str, where: str, what: str = "the file name") -> None:
    """`name` must be a plain file name relative to `where` (a folder); `what` names the input."""
    check_file_name(name, what)
    parts = Path(name.replace("\\", "/")).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name or ".." in parts:
        raise ValueError(f"{what} {name!r} must be relative to {where}, without '..' or a drive; give "
                         "a plain name such as alignprop/my_lora.")


def _inside(root: str, name: str) -> str:
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, name))
    if os.path.commonpath([root_real, path]) != root_real:
        raise ValueError(f"file name {name!r} resolves outside {root}; give a plain relative name.")
    return path


NO_FILE = "(none)"
SHIPPED = "shipped/"


def prompt_files() -> list[str]:
    """Prompt-list choices: none, the lists shipped with the core, and .txt files in ComfyUI's input folder."""
    from importlib import resources

    shipped = sorted(SHIPPED + p.name for p in resources.files("alignprop_core.data").iterdir()
                     if p.name.endswith(".txt"))
    root = folder_paths.get_input_directory()
    own = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                 for f in files if f.endswith(".txt")) if os.path.isdir(root) else []
    return [NO_FILE, *shipped, *own]


def read_prompt_file(name: str) -> str:
    """Text of a prompt-list choice from `prompt_files`."""
    from alignprop_core.files.prompts import shipped_prompts

    if name.startswith(SHIPPED):
        return "\n".join(shipped_prompts(Path(name[len(SHIPPED):]).stem))
    _check_relative(name, "ComfyUI's input folder")
    path = _inside(folder_paths.get_input_directory(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {name!r} is not in ComfyUI's input folder; put it there "
                                "(one prompt per line) and refresh the page.")
    with open(path, encoding="utf-8") as f:
        return f.read()
