"""Run a bench worker module in a fresh Python process and read back its one JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(module: str, payload: dict, python: str | None = None, timeout: float = 3600,
               extra_env: dict | None = None) -> dict:
    """`python -m module '<payload>'` from the repo root; returns the parsed last stdout line.

    Raises:
        RuntimeError: the worker failed; its stderr tail is in the message.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(
        payload.get("_threads", 1)), **(extra_env or {}))
    proc = subprocess.run([python or sys.executable, "-m", module, json.dumps(payload)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])
