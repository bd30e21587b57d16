"""Run a node of this pack inside a ComfyUI process without a server, for checks an HTTP API cannot do.

The test process never imports ComfyUI (its `nodes.py` would clash with this repository's `nodes/`
package), so `run_script` starts a subprocess that calls `setup` first: ComfyUI's directory goes on
sys.path with `--cpu`, its model folders point into a given base directory, and this repository is
imported as a custom-node package the way ComfyUI's loader does it (`ComfyUI_AlignProp.nodes...`).
`execute` then runs a node class the way ComfyUI's executor does: a class clone with the hidden
inputs set, under `torch.inference_mode()`.

A script writes its results with `torch.save` to a path it is given; the caller loads them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACKAGE = "ComfyUI_AlignProp"


def run_script(code: str, comfy_dir: Path, base_dir: Path, *args: str, timeout: float = 900.0
               ) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with sys.argv = [comfy_dir, base_dir, *args]; raise on failure.

    `code` should start with ``import inproc; inproc.setup(sys.argv[1], sys.argv[2])``.
    """
    # tests/ too, for the tiny-model makers (tiny_flow_transformers) that scripts share with tests
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    prelude = "import sys\nsys.argv = sys.argv[1:]\n"
    out = subprocess.run([sys.executable, "-c", prelude + code, "-", str(comfy_dir), str(base_dir), *args],
                         env=env, capture_output=True, text=True, timeout=timeout, cwd=str(comfy_dir))
    if out.returncode != 0:
        raise RuntimeError(f"the ComfyUI subprocess failed (exit {out.returncode}):\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


# The start of a script that trains on a checkpoint: argv = comfy_dir, base_dir, checkpoint path,
# JSON settings (test_trainer_server.inproc_settings), the results path, then the script's own arguments.
# `train_inputs` holds the trainer's own inputs and its settings sockets, each made by its settings node.
TRAINING_PRELUDE = r"""
import json, os, sys, torch
import inproc
nodes = inproc.setup(sys.argv[1], sys.argv[2])
ckpt, settings, out_path = sys.argv[3:6]
settings = json.loads(settings)
import comfy.model_management as mm
import comfy.sd
from alignprop_core.config import SamplerConfig
from alignprop_core.rewards import make_reward
from alignprop_core.rewards.base import FunctionReward

with torch.inference_mode():
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
smooth = make_reward("smoothness")
classes = {c.define_schema().node_id: c for c in nodes.NODE_CLASSES}
train_inputs = dict(settings["train"], **{socket: inproc.execute(classes[node_type], **inputs).result[0]
                                          for socket, (node_type, inputs) in settings["settings"].items()})
"""


def setup(comfy_dir: str, base_dir: str):
    """Make ComfyUI importable (CPU only, model folders under base_dir) and import this pack.

    Returns:
        the pack's `nodes` package (``ComfyUI_AlignProp.nodes``).
    """
    comfy_dir = str(Path(comfy_dir).resolve())
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    import folder_paths
    # ComfyUI's utils package, imported before its nodes.py puts comfy/ first on sys.path (after
    # which "utils" would be comfy/utils.py), as main.py does
    importlib.import_module("utils.install_util")

    base = Path(base_dir).resolve()
    folder_paths.base_path = str(base)
    folder_paths.models_dir = str(base / "models")
    for folder in ("checkpoints", "loras", "clip_vision"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[folder] = ([str(base / "models" / folder)],
                                                       folder_paths.supported_pt_extensions)
    for name, setter in (("input", folder_paths.set_input_directory),
                         ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory)):
        (base / name).mkdir(parents=True, exist_ok=True)
        setter(str(base / name))

    spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    from ComfyUI_AlignProp import nodes  # noqa: the package just registered

    nodes.register_reward_folder()  # models/reward_models under the new models_dir
    return nodes


def execute(node_class, unique_id: str | None = None, **inputs):
    """`node_class`'s outputs for `inputs`, run as ComfyUI's executor runs a node (inference mode)."""
    import torch
    from comfy_api.latest import io

    clone = node_class.PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id} if unique_id else {})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs)


@contextlib.contextmanager
def warnings_logged():
    """The messages of every warning logged inside the block (e.g. ComfyUI's "lora key not loaded")."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger().removeHandler(handler)
