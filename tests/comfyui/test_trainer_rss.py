"""One ComfyUI server trains twenty LoRAs in a row and its resident memory stays flat.

A fresh server (its own base directory, so no other test's models or history sit in it) runs the
AlignProp Trainer graph of test_trainer_server.py twenty times on the random SD1.5 checkpoint, with
a new lora_name and seed each time so ComfyUI's cache cannot skip the trainer. After each run the
server process's resident set size (VmRSS in /proc/<pid>/status) is read. The first run loads the
models and warms the allocator, so it is the reference: after the last run RSS may exceed it by at
most 5 % (about 100 MiB of the server's 2 GiB, so about 5 MiB kept per run): a kept model copy or
autograd graph with its activations fails it; a kept LoRA alone (1 MiB here) would not, and the
printed series shows the per-run trend for a reader to judge.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import harness
from test_trainer_server import trainer_graph

pytestmark = pytest.mark.slow

RUNS = 20
MAX_GROWTH = 1.05  # RSS after the last run / RSS after the first
CHECKPOINT_CACHE = harness.REPO_ROOT / ".cache" / "comfyui" / "checkpoints"
# the graph's tiny settings made tinier (one prompt, one evaluation image, two sampler steps): twenty
# runs must fit in a few minutes on two busy cores
SAMPLER_STEPS = 2
TRAIN_OVERRIDES = {"prompts": "a cat", "eval_batch_size": 1}


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB, from /proc (Linux only; psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line; is process {pid} still running?")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used so far, in seconds (fields 14-15 of /proc stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def rss_server(comfy_dir: Path, tmp_path_factory):
    """A server of its own with the random SD1.5 checkpoint installed; yields (server, ckpt_name)."""
    base = harness.prepare_base_dir(tmp_path_factory.mktemp("rss-base"))
    source = harness.cached_random_checkpoint("sd15", CHECKPOINT_CACHE, comfy_dir=comfy_dir)
    name = "alignprop_random_sd15.ckpt"
    shutil.copyfile(source, base / "models" / "checkpoints" / name)
    with pytest.MonkeyPatch.context() as patch:
        # one torch thread: on two cores shared with other work, torch's default two OpenMP threads
        # spin against each other and a run takes 30-60 CPU s instead of about 5; memory is what is
        # measured here, and the thread count does not change what a run keeps
        patch.setenv("OMP_NUM_THREADS", "1")
        server = harness.start_server(comfy_dir, base)
    try:
        yield server, name
    finally:
        server.stop()


def test_rss_is_flat_over_twenty_trainer_runs(rss_server):
    server, ckpt = rss_server
    if not Path(f"/proc/{server.process.pid}/status").is_file():
        pytest.skip("needs /proc to read the server's memory (Linux)")
    loras = server.models_dir / "loras" / "alignprop"
    started = time.monotonic()
    pid = server.process.pid
    series = [rss_mib(pid)]  # index 0: the idle server, before any run
    cpu = []  # CPU seconds of each run: shows whether runs get slower, apart from other load
    for run in range(RUNS):
        name = f"rss_run_{run:02d}"
        graph = trainer_graph(ckpt, f"alignprop/{name}", seed=run, **TRAIN_OVERRIDES)
        graph["3"]["inputs"]["steps"] = SAMPLER_STEPS
        before = set(loras.glob("*.safetensors")) if loras.is_dir() else set()
        cpu_before = cpu_seconds(pid)
        server.run(graph, timeout=600)
        cpu.append(cpu_seconds(pid) - cpu_before)
        # the trainer really ran: exactly one new LoRA file, named for this run
        new = {p for p in set(loras.glob("*.safetensors")) - before if not p.stem.endswith("-best")}
        assert [p.name for p in new] == [f"{name}.safetensors"], (run, sorted(p.name for p in new))
        series.append(rss_mib(pid))

    elapsed = time.monotonic() - started
    first, last = series[1], series[-1]
    curve = ", ".join(f"{value:.0f}" for value in series)
    report = (f"server RSS in MiB, idle then after each of {RUNS} trainer runs: [{curve}]; "
              f"last/first run = {last / first:.3f}, {(last - series[2]) / (RUNS - 2):+.2f} MiB per run "
              f"after the second, peak {max(series[1:]):.0f} MiB; CPU s per run: "
              f"[{', '.join(f'{c:.1f}' for c in cpu)}]; {elapsed:.0f} s in all")
    print(f"\n[rss] {report}")
    assert last <= MAX_GROWTH * first, report
