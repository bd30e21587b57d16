"""Data parallel on gloo: the step time of 2 ranks against 1 process at the same per-rank batch.

Each rank samples, decodes and scores its own batch, then the ranks average the LoRA gradient with
one all-reduce, so with a core per rank the step time stays that of one process (ratio 1.0) and the
global batch doubles; what the ratio shows above 1 is the all-reduce, the ranks waiting for the
slowest, and the two processes sharing memory bandwidth. Every measurement is a fresh set of
processes with one torch thread each (this machine has 2 cores); rounds alternate 1 and 2 ranks so
both see the same background load, and the ratio is the median over rounds of the median step times.

`python -m bench.data_parallel '<JSON>'` is one rank (RANK etc. in the environment) or one process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

from bench.rig import RigSpec, build_rig
from bench.subproc import ROOT, run_worker
from bench.timing import median, time_call

SPEC = RigSpec(model="alignprop_core/data/toy_world", reward="toy_count", steps=10, k=3, batch=4, guidance=4.0)


def _ranks(payload: dict, ranks: int, timeout: float = 1800) -> dict:
    """Start `ranks` ranks of this module on 127.0.0.1; returns rank 0's result."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(ranks):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.data_parallel", json.dumps(payload)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"bench.data_parallel rank failed ({p.returncode}): {err[-2000:]}")
    return json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1])


def run(repeats: int, rounds: int = 3, spec: RigSpec = SPEC) -> dict:
    payload = {**asdict(spec), "_repeats": repeats, "_threads": 1}
    rows = []
    for _ in range(rounds):
        one = run_worker("bench.data_parallel", payload)
        two = _ranks(payload, 2)
        rows.append({"one_s": median(one["step_s"]), "two_s": median(two["step_s"]),
                     "ratio": median(two["step_s"]) / median(one["step_s"])})
    return {"spec": asdict(spec), "repeats": repeats, "rounds": rows,
            "one_s": median([r["one_s"] for r in rows]), "two_s": median([r["two_s"] for r in rows]),
            "ratio": median([r["ratio"] for r in rows])}


def measure(payload: dict) -> dict:
    from alignprop_core.parallel import init_world

    repeats, threads = payload.pop("_repeats", 3), payload.pop("_threads", 1)
    torch.set_num_threads(threads)
    world = init_world(torch.device("cpu"))
    try:
        rig = build_rig(RigSpec(**payload))
        rig.world = world
        rig.train_step()  # warm-up: AdamW state and one-time allocations
        step_s = [time_call(rig.train_step) for _ in range(repeats)]
    finally:
        world.close()
    return {"step_s": step_s, "ranks": world.size}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
