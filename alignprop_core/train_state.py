"""Saving and restoring the full training state, for exact resume.

The state holds the step, the LoRA tensors, the AdamW moments, the grad-scaler state, the trainer's
random generator and the metric history. It is written atomically with `torch.save` and read back with
`torch.load(weights_only=True)`, so a state file can never run code when loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    """Everything needed to continue a run as if it had never stopped."""

    step: int  # optimiser steps completed
    lora: dict[str, torch.Tensor]  # peft-form LoRA tensors
    optimizer: dict[str, Any]  # torch.optim state_dict
    scaler: dict[str, Any]  # torch.amp.GradScaler state_dict (empty when unused)
    generator: torch.Tensor  # torch.Generator.get_state() of the trainer's generator
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics so far
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation results so far
    config: dict[str, Any] = field(default_factory=dict)  # the run's configs, to detect mismatches
    reward_state: dict[str, Any] = field(default_factory=dict)  # e.g. a mixture's running statistics


def save_train_state(path: str | os.PathLike, state: TrainState) -> Path:
    """Write `state` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": state.step,
        "lora": {k: v.detach().cpu().contiguous() for k, v in state.lora.items()},
        "optimizer": state.optimizer,
        "scaler": state.scaler,
        "generator": state.generator.cpu(),
        # metrics and configs travel as JSON text: plain data, loadable with weights_only=True
        "history": json.dumps(state.history),
        "evals": json.dumps(state.evals),
        "config": json.dumps(state.config),
        "reward_state": json.dumps(state.reward_state),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_train_state(path: str | os.PathLike) -> TrainState:
    """Read a state written by `save_train_state` (no pickled code is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist; give a file written by a "
                                "run with save_every > 0 (it is named train_state.pt in the output folder).")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"step", "lora", "optimizer", "generator"} - set(raw)
    if missing:
        raise ValueError(f"{path} is not an AlignProp training state (missing {sorted(missing)}).")
    return TrainState(step=int(raw["step"]), lora=raw["lora"], optimizer=raw["optimizer"],
                      scaler=raw.get("scaler", {}), generator=raw["generator"],
                      history=json.loads(raw.get("history", "[]")),
                      evals=json.loads(raw.get("evals", "[]")),
                      config=json.loads(raw.get("config", "{}")),
                      reward_state=json.loads(raw.get("reward_state", "{}")))
