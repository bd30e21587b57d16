"""Output files: names checked before any work, no silent replacement, a separate name for partial runs.

Every writer (the trainer, the CLI, the ComfyUI nodes) goes through these rules:
- a name is checked before the first model load: no control characters, no component longer than
  the file system allows, not a folder, and LoRAs are ``.safetensors`` (`check_file_name`,
  `lora_file_name`);
- an existing file is never replaced unless the caller asked for it (`claim`), or the next free
  numbered name is taken, as ComfyUI's SaveImage does (`numbered_path`);
- a run that fails or is cancelled writes ``<name>-partial.safetensors`` (`partial_path`), never the
  final name, so an earlier finished LoRA of that name survives.
The folder is probed for writing up front (`check_writable`), so a read-only folder fails in
milliseconds, not after training.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

LORA_SUFFIX = ".safetensors"
MAX_NAME_BYTES = 255  # one path component on ext4, APFS, NTFS (in UTF-16 units there, about the same)
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensor")
PARTIAL = "-partial"


def check_file_name(name: str, what: str = "the file name") -> None:
    """ValueError naming `what` if `name` cannot be a file name on an ordinary file system."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} is empty; give a name such as alignprop/my_lora.")
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"{what} {name!r} contains the control character(s) {shown}; "
                         "use letters, digits, spaces, '-', '_' and '/'.")
    if name.endswith(("/", "\\")):
        raise ValueError(f"{what} {name!r} names a folder, not a file; end it with a file name.")
    for part in name.replace("\\", "/").split("/"):
        size = len(part.encode("utf-8"))
        if size + len(LORA_SUFFIX) + len(PARTIAL) + 6 > MAX_NAME_BYTES:
            raise ValueError(f"{what}: the part {part[:40]!r}... is {size} bytes long; file systems "
                             f"allow {MAX_NAME_BYTES} per name (with the suffix and a counter), so "
                             "shorten it.")


def lora_file_name(name: str, what: str = "the LoRA name") -> str:
    """`name` checked and ending in .safetensors (added when missing); ValueError for another format."""
    check_file_name(name, what)
    lowered = name.lower()
    if lowered.endswith(LORA_SUFFIX):
        return name
    for suffix in OTHER_WEIGHT_SUFFIXES:
        if lowered.endswith(suffix):
            raise ValueError(f"{what} {name!r} ends in {suffix}; LoRAs are written as .safetensors "
                             f"(the format ComfyUI, Forge and diffusers load), so use "
                             f"{name[: -len(suffix)]}{LORA_SUFFIX}.")
    return name + LORA_SUFFIX


def partial_path(path: str | os.PathLike) -> Path:
    """Where a failed or cancelled run keeps its LoRA: ``<stem>-partial<suffix>`` beside `path`."""
    path = Path(path)
    return path.with_name(path.stem + PARTIAL + path.suffix)


def numbered_path(path: str | os.PathLike, companions: Sequence[Callable[[str], str]] = ()) -> Path:
    """`path` if free, else the first free ``<stem>_00001<suffix>``, ``_00002``, ... beside it.

    `companions` map a file name to the name of a file written beside it (e.g. the best LoRA's);
    a candidate is free only if those are free too.
    """
    path = Path(path)

    def free(candidate: Path) -> bool:
        return not any(os.path.lexists(candidate.with_name(name))
                       for name in (candidate.name, *(c(candidate.name) for c in companions)))

    if free(path):
        return path
    for n in range(1, 100000):
        candidate = path.with_name(f"{path.stem}_{n:05d}{path.suffix}")
        if free(candidate):
            return candidate
    raise FileExistsError(f"{path} and 99999 numbered versions of it exist; choose another name.")


def claim(path: str | os.PathLike, overwrite: bool, what: str = "the output") -> Path:
    """`path`, after checking it may be written: FileExistsError if it exists and not `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{what} {path} already exists and would be replaced; choose another "
                              "name, or allow replacing it (--overwrite on the command line, overwrite "
                              "on the node).")
    return path


def check_writable(folder: str | os.PathLike, what: str = "the output folder") -> Path:
    """Create `folder` if needed and prove a file can be written there (PermissionError otherwise)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder; give a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".alignprop-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{what} {folder} cannot be written ({err.strerror or err}); choose a "
                              "folder you can write to.") from err
    return folder


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run `write(temp_path)` on a hidden temporary file beside `path`, then rename it into place.

    The rename is atomic on one file system, so a reader (or a process killed mid-save) sees the old
    file or the new one, never a torn one. The file gets the permissions a plain `open` would give
    (0666 less the umask), not the 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (a server's other threads
    create files meanwhile); elsewhere by setting it and putting it straight back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
