"""Session fixtures for the real-ComfyUI-server tests (marker `slow`).

`comfy_dir` sets up ComfyUI 0.3.75 once (tests/comfyui/setup_comfyui.py); `server` starts it once
per session on 127.0.0.1 with a fresh base directory holding models/{checkpoints,loras,clip_vision,
reward_models}, input, output, user, temp and custom_nodes/ComfyUI-AlignProp (a link to this
repository). `sd15_checkpoint` and `sdxl_checkpoint` put tiny random checkpoints that ComfyUI
detects as SD1.5 / SDXL into its models/checkpoints and return their `ckpt_name`.

Outside CI (no `CI` environment variable) the tests are skipped, saying why, when ComfyUI cannot be
fetched or installed (e.g. PyPI unreachable); in CI that is a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import setup_comfyui  # noqa: E402

CHECKPOINT_CACHE = harness.REPO_ROOT / ".cache" / "comfyui" / "checkpoints"


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    """The ComfyUI directory (holding main.py), set up once and reused across sessions."""
    try:
        return setup_comfyui.ensure_comfyui(setup_comfyui.DEFAULT_DEST)
    except subprocess.CalledProcessError as error:  # pip could not download or install
        reason = f"ComfyUI setup impossible ({error}); run tests/comfyui/setup_comfyui.py to see why"
        if os.environ.get("CI"):
            pytest.fail(reason)
        print(f"\n[comfyui] SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy_base_dir(tmp_path_factory) -> Path:
    """Fresh per-session base directory for ComfyUI's models, input, output, user and temp."""
    return harness.prepare_base_dir(tmp_path_factory.mktemp("comfyui-base"))


@pytest.fixture(scope="session")
def server(comfy_dir: Path, comfy_base_dir: Path):
    """A ComfyUI server started once per session; stopped (terminate, then kill) at the end."""
    started = time.monotonic()
    srv = harness.start_server(comfy_dir, comfy_base_dir)
    print(f"\n[comfyui] server up on {srv.url} in {time.monotonic() - started:.1f} s "
          f"(base {comfy_base_dir}, log {srv.log_path})")
    try:
        yield srv
    finally:
        srv.stop()


def _install_checkpoint(kind: str, comfy_dir: Path, base_dir: Path) -> str:
    started = time.monotonic()
    source = harness.cached_random_checkpoint(kind, CHECKPOINT_CACHE, comfy_dir=comfy_dir)
    name = f"alignprop_random_{kind}.ckpt"
    shutil.copyfile(source, base_dir / "models" / "checkpoints" / name)
    print(f"\n[comfyui] {name}: {source.stat().st_size / 1e6:.1f} MB, ready in "
          f"{time.monotonic() - started:.1f} s")
    return name


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_dir: Path, comfy_base_dir: Path) -> str:
    """`ckpt_name` of a random checkpoint ComfyUI detects as SD1.5 (in the server's models/checkpoints)."""
    return _install_checkpoint("sd15", comfy_dir, comfy_base_dir)


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfy_dir: Path, comfy_base_dir: Path) -> str:
    """`ckpt_name` of a random checkpoint ComfyUI detects as SDXL (in the server's models/checkpoints)."""
    return _install_checkpoint("sdxl", comfy_dir, comfy_base_dir)


@pytest.fixture(scope="session")
def sd3_checkpoint(comfy_dir: Path, comfy_base_dir: Path) -> str:
    """`ckpt_name` of a random checkpoint ComfyUI detects as SD3 (SD3.5-medium-like MMDiT, CLIP-L/G, no T5)."""
    return _install_checkpoint("sd3", comfy_dir, comfy_base_dir)


@pytest.fixture(scope="session")
def flux_files(comfy_dir: Path, comfy_base_dir: Path) -> dict[str, str]:
    """File names of random FLUX.1-dev files ComfyUI's loaders detect, in the server's diffusion_models,
    text_encoders and vae folders: {"unet_name", "clip_l", "t5xxl", "vae_name"}."""
    started = time.monotonic()
    harness.install_random_flux(comfy_base_dir, comfy_dir=comfy_dir)
    print(f"\n[comfyui] FLUX.1 files ready in {time.monotonic() - started:.1f} s")
    files = harness.FLUX_FILES
    return {"unet_name": files["diffusion_models"], "clip_l": files["text_encoders"][0],
            "t5xxl": files["text_encoders"][1], "vae_name": files["vae"]}


@pytest.fixture(scope="session")
def zimage_files(comfy_dir: Path, comfy_base_dir: Path) -> dict[str, str]:
    """File names of random Z-Image files ComfyUI's loaders detect, in the server's diffusion_models,
    text_encoders and vae folders: {"unet_name", "qwen3_4b", "vae_name"}."""
    started = time.monotonic()
    harness.install_random_zimage(comfy_base_dir, comfy_dir=comfy_dir)
    print(f"\n[comfyui] Z-Image files ready in {time.monotonic() - started:.1f} s")
    files = harness.ZIMAGE_FILES
    return {"unet_name": files["diffusion_models"], "qwen3_4b": files["text_encoders"], "vae_name": files["vae"]}
