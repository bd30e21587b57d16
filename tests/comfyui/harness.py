"""Run a real ComfyUI server for the integration tests, and write tiny random checkpoints for it.

`start_server` launches ComfyUI's own ``main.py`` as a subprocess bound to 127.0.0.1, with every
writable folder (models, input, output, user, temp, custom_nodes, its database) in a fresh base
directory, and this repository linked in as the custom-node pack ``ComfyUI-AlignProp``. The `Server`
it returns talks to ComfyUI's HTTP API (``/object_info``, ``/prompt``, ``/history``, ``/interrupt``)
with the standard library only, so this module imports even before ComfyUI is set up.

`make_random_checkpoint` writes an SD1.5, SDXL or SD3 checkpoint whose keys and shapes are the ones
ComfyUI itself saves, so its ``model_detection`` recognises it, but with a reduced UNet. ComfyUI
builds the text encoders (CLIP-L, OpenCLIP-G) and the VAE at full size from fixed configs and leaves
weights missing from a checkpoint uninitialised, so every weight must be present. To keep the file
small anyway it is a torch ``.ckpt``: each weight is a strided view whose rows are shifted windows of
one short random vector, and ``torch.save`` stores only that vector (safetensors cannot share bytes).
The builder imports ComfyUI in a subprocess (``python harness.py make-checkpoint ...``) so the test
process never imports ComfyUI. `make_random_clip_vision` writes a full-size random CLIP ViT-L/14 vision
tower the same compact way, for ComfyUI's CLIPVisionLoader (which refuses anything smaller).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-AlignProp"  # the pack's folder name under custom_nodes/
DEFAULT_COMFY_DIR = REPO_ROOT / ".cache" / "comfyui" / "ComfyUI"
MODEL_FOLDERS = ("checkpoints", "loras", "clip_vision", "reward_models")
HOST = "127.0.0.1"

# Configs in the form comfy.model_detection.detect_unet_config returns them. SD15 matches on
# model_channels=320, context_dim=768, no linear proj_in, no adm; SDXL additionally on
# transformer_depth=[0, 0, 2, 2, 10, 10], context_dim=2048 and adm_in_channels=2816. Depth and
# channel_mult are not matched, so those are reduced.
_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_CONFIGS = {
    "sd15": {
        **_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    },
    "sdxl": {
        **_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        # 10 as in SDXL: diffusers' UNet2DConditionModel gives its mid block the depth of the last down
        # block, so only this depth has a diffusers twin (test_equivalence_sdxl.py)
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    },
}
# SD3/SD3.5 (MMDiT): detection reads every width from the weights and the depth as width / 64, so
# this is 2 joint blocks of width 128, with SD3.5's RMS q/k norms and a second attention in block 0
# (SD3.5 medium). The text inputs keep SD3's widths: CLIP-L + G (+ T5) context 4096, pooled 2048.
UNET_CONFIGS["sd3"] = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [0],
}
# the text encoders an SD3 checkpoint holds, by the key ComfyUI's SD3.clip_target looks for
SD3_TEXT_ENCODERS = ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                     "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight")
# comfy/sd.py builds the SD1.x/SDXL VAE with exactly this config whatever the weights' shapes.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
ROW_STEP = 3  # elements between consecutive rows of a compact random weight


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def prepare_base_dir(base_dir: Path) -> Path:
    """Create ComfyUI's writable folders under base_dir and link this repository in as the pack."""
    base_dir = Path(base_dir).resolve()
    for name in MODEL_FOLDERS:
        (base_dir / "models" / name).mkdir(parents=True, exist_ok=True)
    for name in ("input", "output", "user", "temp", "custom_nodes"):
        (base_dir / name).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / PACK_NAME
    if link.is_symlink() and link.resolve() != REPO_ROOT:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base_dir


@dataclass
class Server:
    """A running ComfyUI subprocess and a small client for its HTTP API."""

    process: subprocess.Popen
    port: int
    base_dir: Path
    comfy_dir: Path
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None, timeout: float = 30.0):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        """Every registered node type with its inputs and outputs (``GET /object_info``)."""
        return self._request("/object_info", timeout=60.0)

    def queue(self, prompt: dict, client_id: str = "alignprop-tests") -> str:
        """Queue an API-format graph; return its prompt id or raise with ComfyUI's validation errors."""
        try:
            reply = self._request("/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"ComfyUI rejected the prompt (HTTP {error.code}): {detail}") from None
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll ``/history/<id>`` until the prompt finishes; return its history entry.

        Raises RuntimeError with ComfyUI's status messages and the log tail if execution failed or
        the server died, and TimeoutError (after interrupting the prompt) if it did not finish.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while running "
                                   f"prompt {prompt_id}\n{self.log_tail()}")
            entry = (self._request(f"/history/{prompt_id}") or {}).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") == "error":
                messages = json.dumps(status.get("messages", []), indent=1)[-6000:]
                raise RuntimeError(f"prompt {prompt_id} failed:\n{messages}\n{self.log_tail()}")
            if status.get("completed"):
                return entry
            time.sleep(poll)
        self.interrupt()
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a graph and wait for it; return the history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def interrupt(self) -> None:
        """Ask ComfyUI to stop the prompt that is executing now."""
        self._request("/interrupt", {})

    def output_images(self, entry: dict) -> list[Path]:
        """Files that a history entry's nodes wrote to the output folder."""
        paths = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    paths.append(self.output_dir / image.get("subfolder", "") / image["filename"])
        return paths

    # -- process ------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything ComfyUI printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server, then kill it if it has not exited within timeout seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_command(comfy_dir: Path, base_dir: Path, port: int) -> list[str]:
    """The ComfyUI command line: CPU only, 127.0.0.1 only, every writable path under base_dir."""
    return [
        sys.executable, str(Path(comfy_dir) / "main.py"),
        "--cpu", "--listen", HOST, "--port", str(port), "--disable-auto-launch",
        "--base-directory", str(base_dir),  # models/, custom_nodes/, input/, output/, temp/, user/
        "--output-directory", str(base_dir / "output"),
        "--input-directory", str(base_dir / "input"),
        "--user-directory", str(base_dir / "user"),
        "--database-url", f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",  # default is inside ComfyUI/
        "--disable-api-nodes",  # paid cloud nodes: not needed, and they slow the start
    ]


def start_server(comfy_dir: Path, base_dir: Path, port: int | None = None, timeout: float = 180.0,
                 extra_args: tuple[str, ...] = ()) -> Server:
    """Start ComfyUI and wait until ``GET /object_info`` answers.

    Args:
        comfy_dir: the ComfyUI directory (holding ``main.py``), e.g. from setup_comfyui.ensure_comfyui.
        base_dir: fresh directory for models, input, output, user, temp and custom_nodes.
        port: TCP port on 127.0.0.1; a free one when None.
        timeout: seconds to wait for the server to answer.
        extra_args: further ComfyUI command-line options.

    Returns:
        The running Server; call ``stop()`` when done. Raises RuntimeError with the log tail if the
        server exits or does not answer in time.
    """
    comfy_dir = Path(comfy_dir).resolve()
    if not (comfy_dir / "main.py").is_file():
        raise FileNotFoundError(f"no main.py in {comfy_dir}; run tests/comfyui/setup_comfyui.py first")
    base_dir = prepare_base_dir(base_dir)
    port = port or free_port()
    log_path = base_dir / "comfyui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # this repo's nodes/ package must not shadow ComfyUI's nodes.py
    log_file = open(log_path, "wb")
    process = subprocess.Popen([*server_command(comfy_dir, base_dir, port), *extra_args], cwd=comfy_dir,
                               env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(process=process, port=port, base_dir=base_dir, comfy_dir=comfy_dir,
                    log_path=log_path, _log_file=log_file)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"ComfyUI exited with code {process.returncode} during start\n{server.log_tail()}")
        try:
            server.object_info()
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"ComfyUI did not answer on port {port} within {timeout:.0f} s\n"
                               f"{server.log_tail()}")
        time.sleep(0.5)


# -- random checkpoints --------------------------------------------------------------------------
def make_random_checkpoint(kind: str, path: Path, comfy_dir: Path = DEFAULT_COMFY_DIR, seed: int = 0,
                           timeout: float = 600.0) -> Path:
    """Write a random-weight SD1.5, SDXL or SD3 checkpoint that ComfyUI detects as that model.

    Args:
        kind: "sd15", "sdxl" or "sd3" (SD3.5-medium-like, with CLIP-L/G and no T5).
        path: destination; must end in ".ckpt" (see the module docstring for why not .safetensors).
        comfy_dir: the ComfyUI directory whose model classes define the key layout.
        seed: seed of the random weights.
        timeout: seconds the builder subprocess may take.

    Returns:
        path. The file holds {"state_dict": {...}} with fp16 weights.
    """
    if kind not in UNET_CONFIGS:
        raise ValueError(f"kind must be one of {sorted(UNET_CONFIGS)}, got {kind!r}")
    path = Path(path).resolve()
    if path.suffix != ".ckpt":
        raise ValueError(f"path must end in .ckpt (a torch checkpoint with shared storage), got {path.name}")
    if not (Path(comfy_dir) / "comfy" / "model_detection.py").is_file():
        raise FileNotFoundError(f"no ComfyUI in {comfy_dir}; run tests/comfyui/setup_comfyui.py first")
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "make-checkpoint", kind, str(path),
           "--comfy-dir", str(Path(comfy_dir).resolve()), "--seed", str(seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"building the {kind} checkpoint failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return path


def cached_random_checkpoint(kind: str, cache_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR,
                             seed: int = 0) -> Path:
    """make_random_checkpoint, reusing the file in cache_dir while the recipe is unchanged.

    The file name carries a hash of the configs and of the builder's source, so any change to how
    checkpoints are made produces a new file.
    """
    recipe = json.dumps([UNET_CONFIGS.get(kind), SD_VAE_DDCONFIG, ROW_STEP, seed, str(Path(comfy_dir).resolve())])
    for function in (_compact_random, _materialize, _build_checkpoint):
        recipe += inspect.getsource(function)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"random_{kind}_{digest}.ckpt"
    if not path.is_file():
        make_random_checkpoint(kind, path, comfy_dir=comfy_dir, seed=seed)
    return path


def install_random_checkpoint(kind: str, base_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR) -> Path:
    """The cached random checkpoint of `kind`, copied into base_dir/models/checkpoints; returns the copy."""
    source = cached_random_checkpoint(kind, REPO_ROOT / ".cache" / "comfyui" / "checkpoints", comfy_dir=comfy_dir)
    local = Path(base_dir) / "models" / "checkpoints" / f"random_{kind}.ckpt"
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, local)
    return local


def _compact_random(shape, std: float, generator, dtype):
    """A (d0, ...) tensor whose row i is the window [i*ROW_STEP, i*ROW_STEP + row_size) of one
    random vector: full-rank-looking weights that torch.save stores in a few KB."""
    import torch

    row_size = math.prod(shape[1:])
    step = min(ROW_STEP, row_size)
    vector = (torch.randn((shape[0] - 1) * step + row_size, generator=generator) * std).to(dtype)
    inner = [math.prod(shape[i + 1:]) for i in range(1, len(shape))]
    return vector.as_strided(tuple(shape), (step, *inner))


def _materialize(name: str, tensor, generator, dtype):
    """Replace a meta tensor by real weights: norms 1, biases 0, matrices N(0, 1/fan_in)."""
    import torch

    if tensor.device.type != "meta":
        return tensor if not tensor.is_floating_point() else tensor.to(dtype)
    if not tensor.is_floating_point():
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    if tensor.ndim == 0:
        value = math.log(100.0) if name.endswith("logit_scale") else 0.0
        return torch.tensor(value, dtype=dtype)
    if tensor.ndim == 1:  # every 1-D weight in these models is a norm scale
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full((1,), fill, dtype=dtype).expand(tensor.shape)
    return _compact_random(tensor.shape, 1.0 / math.sqrt(math.prod(tensor.shape[1:])), generator, dtype)


def _build_checkpoint(kind: str, path: Path, comfy_dir: Path, seed: int) -> None:
    """Runs in a subprocess with ComfyUI importable: build, verify detection, save."""
    sys.path.insert(0, str(comfy_dir))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    import comfy.model_detection
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    expected = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL,
                "sd3": comfy.supported_models.SD3}[kind]
    unet_config = dict(UNET_CONFIGS[kind])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if type(model_config) is not expected:
        raise RuntimeError(f"ComfyUI matches {type(model_config).__name__}, not {expected.__name__}, "
                           f"for {unet_config}")

    with torch.device("meta"):  # shapes only; weights are filled in below
        model = model_config.get_model({}, device="meta")
        if kind == "sd3":  # CLIP-L and G (T5 is optional for SD3); the 16-channel VAE has no quant convs
            clip = model_config.clip_target(dict.fromkeys(SD3_TEXT_ENCODERS)).clip(device="meta", dtype=torch.float16)
            vae = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                "params": {**SD_VAE_DDCONFIG, "z_channels": 16}},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                "params": {**SD_VAE_DDCONFIG, "z_channels": 16}})
        else:
            clip = model_config.clip_target().clip(device="meta", dtype=torch.float16)
            vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    # the same call ComfyUI's CheckpointSave node uses, so the key layout is ComfyUI's own
    layout = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())

    generator = torch.Generator().manual_seed(seed)
    state_dict = {name: _materialize(name, tensor, generator, torch.float16)
                  for name, tensor in sorted(layout.items())}

    detected = comfy.model_detection.detect_unet_config(state_dict, "model.diffusion_model.")
    detected_config = comfy.model_detection.model_config_from_unet_config(detected, state_dict)
    if type(detected_config) is not expected or detected != unet_config:
        raise RuntimeError(f"the written weights detect as {type(detected_config).__name__} with "
                           f"{detected}, expected {expected.__name__} with {unet_config}")

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": state_dict}, tmp)
    tmp.replace(path)
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"{kind}: {len(state_dict)} tensors, {n_params / 1e6:.0f}M parameters, "
          f"{path.stat().st_size / 1e6:.1f} MB -> {path}")


# -- random FLUX.1 files: diffusion model, CLIP-L, T5-XXL, VAE ------------------------------------
# What ComfyUI's Flux detection returns for a FLUX.1-dev file: it fixes 24 heads of 128 (width 3072)
# and reads the depths, text widths and the guidance embedder from the weights; one double and one
# single block keep the model at ~0.5 B parameters.
FLUX_UNET_CONFIG = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
    "patch_size": 2, "vec_in_dim": 768, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
}
# file names in the model folders Load Diffusion Model, DualCLIPLoader and Load VAE read
FLUX_FILES = {"diffusion_models": "alignprop_random_flux1.ckpt", "text_encoders": ("alignprop_random_clip_l.ckpt",
              "alignprop_random_t5xxl_fp8.ckpt"), "vae": "alignprop_random_flux_ae.ckpt"}


def cached_random_flux(cache_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR, seed: int = 0,
                       timeout: float = 900.0) -> dict[str, Path]:
    """Random FLUX.1-dev files ComfyUI's loaders detect, built once per recipe into cache_dir.

    The diffusion model (FLUX_UNET_CONFIG, float16), CLIP-L (float16), T5-XXL (float8_e4m3fn, the
    smallest T5 ComfyUI's FLUX text encoder takes: it is always the 4.7 B-parameter XXL) and the
    16-channel VAE, in the compact form of the checkpoints (a few MB on disk). Returns
    {"diffusion_models": path, "clip_l": path, "t5xxl": path, "vae": path}.
    """
    recipe = json.dumps([FLUX_UNET_CONFIG, SD_VAE_DDCONFIG, ROW_STEP, seed, str(Path(comfy_dir).resolve())])
    for function in (_compact_random, _materialize, _random_ae, _build_flux):
        recipe += inspect.getsource(function)
    folder = Path(cache_dir) / f"random_flux_{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    names = {"diffusion_models": FLUX_FILES["diffusion_models"], "clip_l": FLUX_FILES["text_encoders"][0],
             "t5xxl": FLUX_FILES["text_encoders"][1], "vae": FLUX_FILES["vae"]}
    paths = {key: folder / name for key, name in names.items()}
    if not all(p.is_file() for p in paths.values()):
        _run_builder("make-flux", folder, comfy_dir, seed, timeout)
    return paths


def install_random_flux(base_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR,
                        cache_dir: Path | None = None) -> None:
    """The cached random FLUX.1 files (in cache_dir, by default the tests' .cache/comfyui/checkpoints),
    copied into base_dir's diffusion_models, text_encoders and vae."""
    cache_dir = cache_dir or REPO_ROOT / ".cache" / "comfyui" / "checkpoints"
    paths = cached_random_flux(cache_dir, comfy_dir=comfy_dir)
    for key, folder in (("diffusion_models", "diffusion_models"), ("clip_l", "text_encoders"),
                        ("t5xxl", "text_encoders"), ("vae", "vae")):
        target = Path(base_dir) / "models" / folder / paths[key].name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[key], target)


def _build_flux(folder: Path, comfy_dir: Path, seed: int) -> None:
    """Runs in a subprocess with ComfyUI importable: build on meta, verify detection, save compactly."""
    sys.path.insert(0, str(comfy_dir))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import comfy.model_detection
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.text_encoders.sd3_clip import T5XXLModel

    model_config = comfy.model_detection.model_config_from_unet_config(dict(FLUX_UNET_CONFIG))
    if type(model_config) is not comfy.supported_models.Flux:
        raise RuntimeError(f"ComfyUI matches {type(model_config).__name__}, not Flux")
    with torch.device("meta"):
        model = model_config.get_model({}, device="meta")
        clip_l = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        t5 = T5XXLModel(device="meta", dtype=torch.float8_e4m3fn)
        vae = _random_ae()
    prefix = "diffusion_model."
    layouts = {
        FLUX_FILES["diffusion_models"]: ({k[len(prefix):]: v for k, v in model.state_dict().items()
                                          if k.startswith(prefix)}, torch.float16),
        FLUX_FILES["text_encoders"][0]: (clip_l.transformer.state_dict(), torch.float16),
        FLUX_FILES["text_encoders"][1]: (t5.transformer.state_dict(), torch.float8_e4m3fn),
        FLUX_FILES["vae"]: (vae.state_dict(), torch.float16),
    }

    def check(name, state_dict):
        if name == FLUX_FILES["diffusion_models"]:
            detected = comfy.model_detection.detect_unet_config(state_dict, "")
            if detected != FLUX_UNET_CONFIG:
                raise RuntimeError(f"the FLUX weights detect as {detected}, expected {FLUX_UNET_CONFIG}")
        if name == FLUX_FILES["text_encoders"][1] and comfy.sd.detect_te_model(state_dict) != comfy.sd.TEModel.T5_XXL:
            raise RuntimeError("the T5 weights are not detected as T5-XXL")

    _save_layouts(folder, layouts, torch.Generator().manual_seed(seed), check)


# -- random Z-Image files: diffusion model, Qwen3-4B text encoder, VAE -----------------------------
# What ComfyUI's Lumina2 detection returns for a Z-Image file: it fixes width 3840 and 30 heads and
# reads the depth and caption width from the weights; one main layer (its two noise and two context
# refiners are fixed) keeps the model at ~1 B parameters. CLIPLoader detects Qwen3-4B by its q/k
# norms and always builds the full 36-layer, 4 B-parameter model, so the file holds all of it.
ZIMAGE_UNET_CONFIG = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
    "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
ZIMAGE_FILES = {"diffusion_models": "alignprop_random_zimage.ckpt",
                "text_encoders": "alignprop_random_qwen3_4b_fp8.ckpt", "vae": "alignprop_random_zimage_ae.ckpt"}


def cached_random_zimage(cache_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR, seed: int = 0,
                         timeout: float = 900.0) -> dict[str, Path]:
    """Random Z-Image files ComfyUI's loaders detect, built once per recipe into cache_dir.

    The diffusion model (ZIMAGE_UNET_CONFIG, bfloat16), Qwen3-4B (float8_e4m3fn) and the 16-channel
    VAE (float16), compact on disk. Returns {"diffusion_models": path, "qwen3_4b": path, "vae": path}.
    """
    recipe = json.dumps([ZIMAGE_UNET_CONFIG, SD_VAE_DDCONFIG, ROW_STEP, seed, str(Path(comfy_dir).resolve())])
    for function in (_compact_random, _materialize, _random_ae, _build_zimage):
        recipe += inspect.getsource(function)
    folder = Path(cache_dir) / f"random_zimage_{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    paths = {"diffusion_models": folder / ZIMAGE_FILES["diffusion_models"],
             "qwen3_4b": folder / ZIMAGE_FILES["text_encoders"], "vae": folder / ZIMAGE_FILES["vae"]}
    if not all(p.is_file() for p in paths.values()):
        _run_builder("make-zimage", folder, comfy_dir, seed, timeout)
    return paths


def install_random_zimage(base_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR) -> None:
    """The cached random Z-Image files, copied into base_dir's diffusion_models, text_encoders and vae."""
    paths = cached_random_zimage(REPO_ROOT / ".cache" / "comfyui" / "checkpoints", comfy_dir=comfy_dir)
    for key, folder in (("diffusion_models", "diffusion_models"), ("qwen3_4b", "text_encoders"), ("vae", "vae")):
        target = Path(base_dir) / "models" / folder / paths[key].name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[key], target)


def _run_builder(command: str, folder: Path, comfy_dir: Path, seed: int, timeout: float) -> None:
    """Run one of this file's `make-*` commands in a fresh interpreter (ComfyUI importable there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), command, str(folder),
           "--comfy-dir", str(Path(comfy_dir).resolve()), "--seed", str(seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")


def _random_ae():
    """The 16-channel autoencoder of FLUX.1 and Z-Image, on the meta device (ComfyUI importable)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    vae_config = {**SD_VAE_DDCONFIG, "z_channels": 16}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": vae_config},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": vae_config})


def _save_layouts(folder: Path, layouts: dict, generator, check) -> None:
    """Materialize each meta layout in its dtype, let `check(name, state_dict)` verify it, save it."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name, (layout, dtype) in layouts.items():
        state_dict = {k: _materialize(k, t, generator, dtype) for k, t in sorted(layout.items())}
        check(name, state_dict)
        tmp = folder / f"{name}.{os.getpid()}.tmp"
        torch.save(state_dict, tmp)
        tmp.replace(folder / name)
        print(f"{name}: {sum(t.numel() for t in state_dict.values()) / 1e6:.0f}M parameters")


def _build_zimage(folder: Path, comfy_dir: Path, seed: int) -> None:
    """Runs in a subprocess with ComfyUI importable: build on meta, verify detection, save compactly."""
    sys.path.insert(0, str(comfy_dir))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import comfy.model_detection
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    from comfy.text_encoders.llama import Qwen3_4B

    model_config = comfy.model_detection.model_config_from_unet_config(dict(ZIMAGE_UNET_CONFIG))
    if type(model_config) is not comfy.supported_models.ZImage:
        raise RuntimeError(f"ComfyUI matches {type(model_config).__name__}, not ZImage")
    with torch.device("meta"):
        model = model_config.get_model({}, device="meta")
        qwen = Qwen3_4B({}, dtype=torch.float8_e4m3fn, device="meta", operations=comfy.ops.manual_cast)
        vae = _random_ae()
    prefix = "diffusion_model."
    layouts = {
        ZIMAGE_FILES["diffusion_models"]: ({k[len(prefix):]: v for k, v in model.state_dict().items()
                                            if k.startswith(prefix)}, torch.bfloat16),
        ZIMAGE_FILES["text_encoders"]: (qwen.state_dict(), torch.float8_e4m3fn),
        ZIMAGE_FILES["vae"]: (vae.state_dict(), torch.float16),
    }

    def check(name, state_dict):
        if name == ZIMAGE_FILES["diffusion_models"]:
            detected = comfy.model_detection.detect_unet_config(state_dict, "")
            if detected != ZIMAGE_UNET_CONFIG:
                raise RuntimeError(f"the Z-Image weights detect as {detected}, expected {ZIMAGE_UNET_CONFIG}")
        if name == ZIMAGE_FILES["text_encoders"] and comfy.sd.detect_te_model(state_dict) != comfy.sd.TEModel.QWEN3_4B:
            raise RuntimeError("the text encoder weights are not detected as Qwen3-4B")

    _save_layouts(folder, layouts, torch.Generator().manual_seed(seed), check)


# -- random CLIP vision tower ----------------------------------------------------------------------
CLIP_VISION_CONFIG = "clip_vision_config_vitl.json"  # what ComfyUI picks for an OpenAI ViT-L/14 file


def make_random_clip_vision(path: Path, comfy_dir: Path = DEFAULT_COMFY_DIR, seed: int = 0) -> Path:
    """Write a random-weight CLIP ViT-L/14 vision tower that ComfyUI's CLIPVisionLoader accepts.

    CLIPVisionLoader only takes full-size ViT-L/H/G files (it builds the model from a fixed config and
    leaves missing weights uninitialised), so every tensor has its full shape: the keys and shapes
    of transformers' CLIPVisionModelWithProjection built from ComfyUI's own ViT-L/14 config, the
    layout of openai/clip-vit-large-patch14 that ComfyUI reads. The values are compact random fp16
    weights as in the checkpoints (a torch ``.ckpt`` of a few MB instead of 0.6 GB of safetensors).

    Returns:
        path, which must end in ".ckpt".
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path).resolve()
    if path.suffix != ".ckpt":
        raise ValueError(f"path must end in .ckpt (a torch checkpoint with shared storage), got {path.name}")
    config_path = Path(comfy_dir) / "comfy" / CLIP_VISION_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"no {config_path}; run tests/comfyui/setup_comfyui.py first")
    config = CLIPVisionConfig(**json.loads(config_path.read_text()))
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    layout = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    generator = torch.Generator().manual_seed(seed)
    state_dict = {name: _materialize(name, tensor, generator, torch.float16)
                  for name, tensor in sorted(layout.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state_dict, tmp)
    tmp.replace(path)
    return path


def cached_random_clip_vision(cache_dir: Path, comfy_dir: Path = DEFAULT_COMFY_DIR, seed: int = 0) -> Path:
    """make_random_clip_vision, reusing the file in cache_dir while the recipe is unchanged."""
    config = (Path(comfy_dir) / "comfy" / CLIP_VISION_CONFIG).read_text()
    recipe = json.dumps([config, ROW_STEP, seed])
    for function in (_compact_random, _materialize, make_random_clip_vision):
        recipe += inspect.getsource(function)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"random_clip_vision_vitl14_{digest}.ckpt"
    if not path.is_file():
        make_random_clip_vision(path, comfy_dir=comfy_dir, seed=seed)
    return path


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Test helpers that need ComfyUI importable.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-checkpoint", help="write a random SD1.5/SDXL/SD3 checkpoint")
    make.add_argument("kind", choices=sorted(UNET_CONFIGS))
    make.add_argument("path", type=Path)
    make.add_argument("--comfy-dir", type=Path, default=DEFAULT_COMFY_DIR)
    make.add_argument("--seed", type=int, default=0)
    flux = sub.add_parser("make-flux", help="write random FLUX.1 diffusion model, CLIP-L, T5-XXL and VAE files")
    flux.add_argument("folder", type=Path)
    flux.add_argument("--comfy-dir", type=Path, default=DEFAULT_COMFY_DIR)
    flux.add_argument("--seed", type=int, default=0)
    zimage = sub.add_parser("make-zimage", help="write random Z-Image diffusion model, Qwen3-4B and VAE files")
    zimage.add_argument("folder", type=Path)
    zimage.add_argument("--comfy-dir", type=Path, default=DEFAULT_COMFY_DIR)
    zimage.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "make-flux":
        _build_flux(args.folder.resolve(), args.comfy_dir.resolve(), args.seed)
    elif args.command == "make-zimage":
        _build_zimage(args.folder.resolve(), args.comfy_dir.resolve(), args.seed)
    elif args.command == "make-checkpoint":
        _build_checkpoint(args.kind, args.path.resolve(), args.comfy_dir.resolve(), args.seed)
    else:
        raise ValueError(f"unknown command {args.command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
