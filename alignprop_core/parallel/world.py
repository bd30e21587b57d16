"""The process group of a data-parallel run and the collectives the trainer needs.

Launch with `torchrun --nproc-per-node N -m alignprop_core train ...` or `accelerate launch
--num_processes N -m alignprop_core train ...`: both set RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in the environment, which `init_world` reads. NCCL is used on CUDA, gloo on the CPU.

Only the LoRA trains, so the gradient to share is small (a few MB): after every micro-batch of the
step has run backward, one all-reduce averages the flattened LoRA gradient. That is what
DistributedDataParallel does, without wrapping a module: the model is called through the sampler's
checkpointed chain, not one module's forward, and a LoRA-sized gradient gains nothing from DDP's
bucketing and overlap. Every rank then takes the same AdamW step and holds the same LoRA.

A rank that dies closes its connections and the others' next collective fails at once; a rank that
hangs is given up after `DistConfig.timeout_s`. Either way the survivors raise `RankLost` with what
happened and what to do, and the trainer saves what was trained so far (rank 0) before exiting.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .shard import Shard

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DistConfig:
    """How the ranks of a torch.distributed run talk to each other."""

    backend: str = field(default="auto", metadata={
        "help": "auto (nccl on CUDA, gloo on the CPU) | gloo | nccl"})
    timeout_s: float = field(default=600.0, metadata={
        "help": "seconds a rank waits for the others at a collective before giving up; a rank that "
                "dies is noticed at once, this bounds a rank that hangs (and rank 0's first evaluation)"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DistConfig.backend={self.backend!r} is not known; use one of {', '.join(BACKENDS)}.")
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s)
                and self.timeout_s > 0):
            raise ValueError(f"DistConfig.timeout_s must be a positive number of seconds, got {self.timeout_s!r}.")


class RankLost(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


@dataclass
class World:
    """This process's place in the run: rank `rank` of `size`, and the collectives over them.

    `single_process()` is the world of a plain run: every collective is the identity and no
    process group exists.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    timeout_s: float = 600.0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    @property
    def writes(self) -> bool:
        """Rank 0 alone writes the LoRA, the training state, metrics and plots."""
        return self.rank == 0

    def _reduce(self, tensor: torch.Tensor, op, what: str) -> torch.Tensor:
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=op)
        except Exception as err:  # noqa: BLE001 - any failure of a collective means a rank was lost
            raise RankLost(
                f"rank {self.rank} of {self.size}: the all-reduce of {what} failed, so another rank has "
                f"stopped or did not answer within {self.timeout_s:g} s ({' '.join(str(err).split())[:300]}). "
                "Look at the other ranks' output for the first error; rank 0 keeps the LoRA trained so "
                "far as <name>-partial.safetensors and the training state, to resume with any number "
                "of ranks.") from err
        return tensor

    def average_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its mean over the ranks (a missing one counts as 0)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params]).to(self.device)
        self._reduce(flat, dist.ReduceOp.SUM, "the LoRA gradient")
        flat /= self.size
        start = 0
        for p in params:
            n = p.numel()
            p.grad = flat[start:start + n].view_as(p).to(p.device, p.dtype)
            start += n

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sum of `values` over the ranks (in float64)."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return self._reduce(t, dist.ReduceOp.SUM, what).tolist()

    def sum_tensor(self, tensor: torch.Tensor, what: str = "the evaluation's numbers") -> torch.Tensor:
        """`tensor` summed element-wise over the ranks (a new tensor on the tensor's device)."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        total = tensor.to(self.device).clone()
        return self._reduce(total, dist.ReduceOp.SUM, what).to(tensor.device)

    def pool_statistics(self, means: list[float], spreads: list[float]) -> tuple[list[float], list[float]]:
        """Per-component (mean, population variance) of this rank's rows -> those of the global
        batch: every rank has the same number of rows, so the pooled mean is the mean of the means and
        the pooled variance the mean of (variance + squared deviation of the rank's mean)."""
        n = len(means)
        total = self.sum([*means, *[v + m * m for m, v in zip(means, spreads)]], "the reward's batch statistics")
        mean = [t / self.size for t in total[:n]]
        return mean, [max(t / self.size - m * m, 0.0) for t, m in zip(total[n:], mean)]

    def check_same(self, text: str, what: str) -> None:
        """ValueError on every rank unless all ranks hold the same `text` (compared by hash)."""
        if self.size == 1:
            return
        import hashlib

        import torch.distributed as dist

        h = float(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))  # 48 bits: exact in float64
        high, neg_low = self._reduce(torch.tensor([h, -h], dtype=torch.float64, device=self.device),
                                     dist.ReduceOp.MAX, what).tolist()
        if high != -neg_low:
            raise ValueError(f"the {self.size} ranks do not agree on {what}; start every rank with the same "
                             "command line, files and training state (torchrun and accelerate launch do).")

    def all_true(self, flag: bool, what: str) -> bool:
        """True on every rank only if `flag` is True on every rank."""
        if self.size == 1:
            return bool(flag)
        return self.sum([0.0 if flag else 1.0], what)[0] == 0.0

    def any_true(self, flag: bool, what: str) -> bool:
        """True on every rank if `flag` is True on any rank."""
        if self.size == 1:
            return bool(flag)
        return self.sum([1.0 if flag else 0.0], what)[0] > 0.0

    def close(self) -> None:
        """Leave the process group (nothing to do for a single process)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def single_process() -> World:
    return World()


def launched_ranks() -> int:
    """WORLD_SIZE as a launcher (torchrun, accelerate launch) set it; 1 when not launched by one."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE={text!r} is not a whole number; launch with "
                         "torchrun or accelerate launch, or unset it.") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} must be >= 1.")
    return size


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: a CUDA device without an index becomes cuda:LOCAL_RANK.

    Raises:
        ValueError: several ranks were given one numbered GPU (NCCL refuses two ranks on one device).
    """
    ranks = launched_ranks()
    if device.type != "cuda" or ranks == 1:
        return device
    if device.index is not None:
        raise ValueError(f"--device {device} with {ranks} ranks would put every rank on one GPU; give "
                         "--device cuda, and each rank trains on cuda:LOCAL_RANK (choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES).")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: torch.device, cfg: DistConfig | None = None) -> World:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    a single-process world when WORLD_SIZE is unset or 1.

    Args:
        device: this rank's training device (see `rank_device`); NCCL needs CUDA.
    """
    cfg = cfg or DistConfig()
    size = launched_ranks()
    if size == 1:
        return single_process()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set; start the ranks with "
                         "torchrun --nproc-per-node N or accelerate launch --num_processes N.")
    import torch.distributed as dist

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend needs CUDA devices, but this rank trains on {device}; use "
                         "--dist-backend gloo (or auto) for CPU training.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 device=device if backend == "nccl" else torch.device("cpu"), timeout_s=cfg.timeout_s)
