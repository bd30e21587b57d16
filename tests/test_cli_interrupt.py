"""Ctrl-C on the command line, then --resume: the LoRA equals the uninterrupted run's (CPU, same seed).

`alignprop train` runs as a real subprocess; once its progress bar shows a few finished steps it gets
SIGINT, what Ctrl-C sends. The run keeps `<name>-partial.safetensors` and `train_state.pt` in --out,
never the final name; `--resume out/train_state.pt` then finishes it, and every LoRA tensor is equal
to that of a run that was never interrupted.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from alignprop_core.lora import load_lora
from alignprop_core.models.tiny_model import ensure_tiny_model_dir

pytestmark = pytest.mark.slow

STEPS = 30
FLAGS = ["--sampler-steps", "3", "--sampler-k", "2", "--steps", str(STEPS), "--batch-size", "2",
         "--width", "16", "--height", "16", "--eval-every", "0", "--lr", "1e-2", "--reward", "smoothness",
         "--threads", "1"]


def _command(model, prompts, out, *extra):
    return [sys.executable, "-m", "alignprop_core", "train", "--model", str(model), "--prompts", str(prompts),
            "--eval-prompts", str(prompts), "--out", str(out), *FLAGS, *extra]


def _run(args, timeout=600):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ctrl_c_then_resume_gives_the_uninterrupted_lora(tmp_path):
    model = ensure_tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\ndog\nhorse\n")
    _run(_command(model, prompts, tmp_path / "full"))

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_command(model, prompts, out), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not re.search(rf"\b([3-9]|1\d)/{STEPS}\b", "".join(seen)):  # a few steps done, many to go
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    log = "".join(seen)
    assert "interrupted at step" in log, log[-2000:]
    assert not (out / "alignprop_lora.safetensors").exists()  # the final name is for finished runs
    partial = load_lora(out / "alignprop_lora-partial.safetensors")
    stopped_at = int(partial.metadata["alignprop.step"])
    assert 1 <= stopped_at < STEPS, stopped_at

    _run(_command(model, prompts, out, "--resume", str(out / "train_state.pt")))
    resumed = load_lora(out / "alignprop_lora.safetensors")
    full = load_lora(tmp_path / "full" / "alignprop_lora.safetensors")
    assert resumed.metadata["alignprop.step"] == str(STEPS)
    assert set(resumed.state) == set(full.state)
    assert all(torch.equal(resumed.state[k], full.state[k]) for k in full.state)
