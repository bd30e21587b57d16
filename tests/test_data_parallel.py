"""Data-parallel training on torch.distributed with gloo: 2 ranks on 127.0.0.1 against one process.

Each run is a fresh process (tests/dist_worker.py): the ranks are started as torchrun would start
them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the reference is the same script without them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignprop_core.parallel import Shard

import torch

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROOT = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(job: dict, folder: Path, ranks: int) -> list[subprocess.Popen]:
    """Start `ranks` processes of the worker on `job` (one plain process when ranks is 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {**job, "out": str(folder)}
    (folder / "job.json").write_text(json.dumps(job))
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    envs = [base] if ranks == 0 else [
        {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)} for port in [_free_port()] for r in range(ranks)]
    return [subprocess.Popen([sys.executable, str(WORKER), str(folder / "job.json")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        done.append((p.returncode, out))
    return done


def _run(job: dict, folder: Path, ranks: int) -> list[dict]:
    results = _finish(_start(job, folder, ranks))
    for code, out in results:
        assert code == 0, out[-3000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(max(ranks, 1))]


def _lora(folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"rank{rank}.safetensors"))


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_close(a: dict, b: dict) -> None:
    # lr 1e-2 moves the weights by ~1e-2 a step; summation order (a batch of 4 vs two of 2) shifts
    # the gradient by ~1e-7 relative, which AdamW's normalisation turns into up to ~1e-4 of a weight
    # whose gradient is near 0. Different prompts or noise differ by ~1e-2 (the test below).
    assert _worst(a, b) <= 1e-4, _worst(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4, 4 steps: the run two ranks of batch 2 must reproduce."""
    folder = tmp_path_factory.mktemp("one_process")
    [result] = _run({"steps": 4, "batch_size": 4}, folder, ranks=0)
    return folder, result


def test_shard_rows_split_the_global_batch_without_overlap():
    a, b = Shard(0, 2), Shard(1, 2)
    assert a.rows(3).tolist() == [0, 1, 2] and b.rows(3).tolist() == [3, 4, 5]
    # DRaFT-LV's blocks: each estimate's block of the global batch is split the same way
    assert b.rows(2, blocks=3).tolist() == [2, 3, 6, 7, 10, 11]
    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat([a.randn((4, 3), g0), b.randn((4, 3), g1)]), full)
    assert torch.equal(Shard().randn((8, 3), torch.Generator().manual_seed(0)), full)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        Shard(2, 2)


def test_two_gloo_ranks_train_the_lora_of_one_process_with_the_global_batch(reference, tmp_path):
    ref_folder, ref = reference
    ranks = _run({"steps": 4, "batch_size": 2}, tmp_path, ranks=2)
    # after every optimiser step both ranks hold bit-identical LoRA weights
    assert len(ranks[0]["digests"]) == 4 and ranks[0]["digests"] == ranks[1]["digests"]
    _assert_close(_lora(tmp_path, 0), _lora(ref_folder))
    for mine, theirs in zip(ranks[0]["history"], ref["history"]):
        assert mine["reward"] == pytest.approx(theirs["reward"], rel=1e-5, abs=1e-6)
        assert mine["k"] == theirs["k"]
    assert [e["eval_reward"] for e in ranks[0]["evals"]] == pytest.approx(
        [e["eval_reward"] for e in ref["evals"]], rel=1e-4, abs=1e-5)
    # rank 0 alone writes
    assert ranks[1]["lora_path"] is None
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "alignprop_lora-best.safetensors", "alignprop_lora.safetensors"]


def test_the_ranks_draw_different_rows_so_one_rank_alone_differs(reference, tmp_path):
    # a single process with the per-rank batch trains another LoRA: the two ranks did not repeat
    # each other's prompts and noise
    [_] = _run({"steps": 4, "batch_size": 2}, tmp_path, ranks=0)
    assert _worst(_lora(tmp_path), _lora(reference[0])) > 2e-3


def test_evaluations_are_split_over_the_ranks_and_give_the_one_process_record(tmp_path):
    # eta 0 and a stateless reward: each rank samples and scores every other batch of held-out images
    job = {"steps": 2, "reward": "smoothness", "sampler": {"eta": 0.0}, "eval_latents": 2, "judge": True}
    [one] = _run({**job, "batch_size": 4}, tmp_path / "one", ranks=0)
    two = _run({**job, "batch_size": 2}, tmp_path / "two", ranks=2)
    assert two[0]["evals"] == two[1]["evals"]  # both ranks hold the whole record
    assert two[0]["judged"] + two[1]["judged"] == one["judged"] > 0  # no image judged twice or left out
    assert two[0]["judged"] == two[1]["judged"]
    for mine, theirs in zip(two[0]["evals"], one["evals"], strict=True):
        assert mine["eval_reward"] == pytest.approx(theirs["eval_reward"], rel=1e-5, abs=1e-6)
        assert mine["diversity"] == pytest.approx(theirs["diversity"], rel=1e-5)
        assert mine["judges"]["colourfulness"] == pytest.approx(theirs["judges"]["colourfulness"], rel=1e-5)
    # the step-0 evaluation (same LoRA everywhere) is the same record, bit for bit
    assert two[0]["evals"][0] == one["evals"][0]


@pytest.mark.parametrize("first, then", [(2, 0), (0, 2)])
def test_a_saved_state_resumes_on_another_number_of_ranks(reference, tmp_path, first, then):
    batch = {0: 4, 2: 2}
    _run({"steps": 2, "batch_size": batch[first], "save_every": 2}, tmp_path / "first", first)
    state = tmp_path / "first" / "lora" / "train_state.pt"
    _run({"steps": 4, "batch_size": batch[then], "resume_from": str(state)}, tmp_path / "then", then)
    _assert_close(_lora(tmp_path / "then"), _lora(reference[0]))


@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_lost_rank_stops_the_other_with_a_clear_error_in_bounded_time(tmp_path, how):
    started = time.monotonic()
    procs = _start({"steps": 8, "batch_size": 1, f"{how}_at_step": 2, "timeout_s": 15}, tmp_path, 2)
    try:
        code, out = _finish(procs[:1], timeout=240)[0]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 240
    assert code != 0
    assert "RankLost" in out and "rank 0 of 2" in out, out[-3000:]
    # rank 0 kept what was trained: the LoRA of step 2 under the partial name, and the state
    assert (tmp_path / "lora" / "alignprop_lora-partial.safetensors").exists()
    assert (tmp_path / "lora" / "train_state.pt").exists()


LAUNCHERS = {  # both start 2 ranks on 127.0.0.1 (accelerate's --multi_gpu runs torchrun's launcher)
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                "--num_processes", "2", "--num_machines", "1", "--main_process_ip",
                                "127.0.0.1", "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_launcher_starts_the_cli_on_two_ranks_and_rank_0_alone_writes(tmp_path, launcher):
    from alignprop_core.models.tiny_model import ensure_tiny_model_dir

    model = ensure_tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\ndog\nhorse\ncow\n")
    flags = ["--model", str(model), "--prompts", str(prompts), "--eval-prompts", str(prompts),
             "--reward", "smoothness", "--sampler-steps", "3", "--sampler-k", "2", "--steps", "2",
             "--width", "16", "--height", "16", "--eval-every", "2", "--lr", "1e-2", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    # with torchrun, rank 0 also plans for a memory budget and rank 1 takes its settings (a budget this
    # large keeps the batch whole; the plan does not change the numbers, only what is recomputed)
    plan = ["--memory-budget", "64"] if launcher == "torchrun" else []
    two = subprocess.run([*LAUNCHERS[launcher](_free_port()), "-m", "alignprop_core", "train", *flags, *plan,
                          "--device", "cpu", "--batch-size", "1",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "alignprop_core", "train", *flags, "--batch-size", "2",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    # one summary (rank 0's), and the same files as a single-process run
    assert two.stdout.count('"lora"') == 1
    assert ("memory plan" in two.stderr.lower()) == bool(plan), two.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    _assert_close(load_file(str(tmp_path / "two" / "alignprop_lora.safetensors")),
                  load_file(str(tmp_path / "one" / "alignprop_lora.safetensors")))


def test_launcher_environment_mistakes_are_named(monkeypatch):
    from alignprop_core.parallel.world import DistConfig, init_world, launched_ranks, rank_device

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a whole number"):
        launched_ranks()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every rank on one GPU.*--device cuda"):
        rank_device(torch.device("cuda", 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT is not set.*torchrun"):
        init_world(torch.device("cpu"))
    for name, value in (("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="nccl backend needs CUDA"):
        init_world(torch.device("cpu"), DistConfig(backend="nccl"))
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        DistConfig(timeout_s=float("nan"))
