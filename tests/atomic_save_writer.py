"""Writer process of tests/test_atomic_saves.py: saves two versions of a file in turn until killed.

The imports take seconds, so the process starts once and forks one writer per kill; the test
SIGKILLs the writer (a real process death in the middle of whatever it was doing) and inspects
the file. A writer saves version 1, then 2, then 1, ... to one path, forever.

Protocol, one line per message:
    stdout  ``ready``              once, after the imports and the two versions are built
    stdin   ``<kind> <path>``      fork a writer; kind is ``lora``, ``lora_file`` or ``train_state``
    stdout  ``saving <pid>``       from the writer, just before its first save
    stdout  ``reaped <status>``    after the writer has died (``os.waitpid`` status)

The test imports this module too, for ``build`` and ``load``: both sides build the same versions.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignprop_core import lora as lora_io  # noqa: E402
from alignprop_core.config import LoraConfig  # noqa: E402
from alignprop_core.lora import add_lora, lora_parameters  # noqa: E402
from alignprop_core.training.train_state import TrainState, load_train_state, save_train_state  # noqa: E402

KINDS = ("lora", "lora_file", "train_state")
VERSIONS = (1, 2)
LAYERS, WIDTH, OUT, RANK = 4, 4096, 64, 64  # LoRA factors (64, 4096) + (64, 64) per layer: ~4.3 MB fp32


def _module_with_lora(value: float) -> tuple[torch.nn.Module, LoraConfig]:
    module = torch.nn.Module()
    module.blocks = torch.nn.ModuleList()
    for _ in range(LAYERS):
        block = torch.nn.Module()
        block.to_q = torch.nn.Linear(WIDTH, OUT, bias=False)
        module.blocks.append(block)
    cfg = LoraConfig(rank=RANK, alpha=8.0, target_modules=("to_q",))
    add_lora(module, cfg)
    with torch.no_grad():
        for _, p in lora_parameters(module):
            p.fill_(value)
    return module, cfg


def _kohya_state(value: float) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(LAYERS):
        name = f"lora_unet_blocks_{i}_to_q"
        state[f"{name}.lora_down.weight"] = torch.full((RANK, WIDTH), value)
        state[f"{name}.lora_up.weight"] = torch.full((OUT, RANK), value)
        state[f"{name}.alpha"] = torch.tensor(8.0)
    return state


def _train_state(version: int) -> TrainState:
    value = float(version)
    return TrainState(
        step=version, lora={k: torch.full((RANK, WIDTH), value) for k in ("a.lora_A.weight", "b.lora_A.weight")},
        optimizer={"state": {0: {"step": torch.tensor(value), "exp_avg": torch.full((RANK, WIDTH), value)}},
                   "param_groups": [{"lr": 0.1 * value, "params": [0]}]},
        scaler={}, generator=torch.Generator().manual_seed(version).get_state(),
        history=[{"loss": -value}] * version, config={"version": version})


def build(kind: str, version: int):
    """What a writer saves for ``version``: a LoRA-injected module, a LoraFile or a TrainState."""
    if kind == "lora":
        return _module_with_lora(float(version))
    if kind == "lora_file":
        return lora_io.LoraFile(state=_kohya_state(float(version)), rank=RANK, alpha=8.0,
                                metadata={"version": str(version)})
    if kind == "train_state":
        return _train_state(version)
    raise ValueError(f"Unknown kind {kind!r}; use one of {', '.join(KINDS)}.")


def save(kind: str, path: str, obj, version: int) -> None:
    if kind == "lora":
        module, cfg = obj
        lora_io.save_lora(path, module, cfg, metadata={"version": str(version)})
    elif kind == "lora_file":
        lora_io.save_lora_file(path, obj)
    else:
        save_train_state(path, obj)


def load(kind: str, path: str):
    """The file at ``path`` read back with the library's own loader."""
    if kind == "train_state":
        return load_train_state(path)
    return lora_io.load_lora(path)


def _writer(kind: str, path: str, versions: dict) -> None:
    os.write(1, f"saving {os.getpid()}\n".encode())
    while True:
        for version in VERSIONS:
            save(kind, path, versions[version], version)


def main() -> None:
    torch.set_num_threads(1)  # no OpenMP pool in the parent of forks
    versions = {kind: {v: build(kind, v) for v in VERSIONS} for kind in KINDS}
    print("ready", flush=True)
    for line in sys.stdin:
        kind, path = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _writer(kind, path, versions[kind])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
