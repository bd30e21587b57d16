"""Which rows of a step's global batch one rank samples, and random draws sharded to match.

Every rank keeps the run's one generator in the same state. Each random draw of a step is made for
the whole global batch (size x per-rank batch rows) and every rank keeps only its own rows, so:
ranks never overlap, a run on N ranks draws exactly what one process with N times the batch draws
(same prompts, noise and K: the same LoRA up to float summation order), and the generator's state
after a step depends only on the global batch, so a saved state resumes on any number of ranks.
With one rank every draw is the one a plain single-process run makes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` ranks, each sampling the same number of rows."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.size - 1} of a world of {self.size}.")

    def rows(self, local: int, blocks: int = 1) -> torch.Tensor:
        """Indices into a global tensor of this rank's rows.

        A local tensor of `blocks` blocks of `local` rows each (DRaFT-LV's n + 1 estimates of every
        prompt) maps to a global one of `blocks` blocks of size x `local` rows.
        """
        one = torch.arange(self.rank * local, (self.rank + 1) * local)
        return torch.cat([one + b * self.size * local for b in range(blocks)])

    def take(self, full: torch.Tensor, blocks: int = 1) -> torch.Tensor:
        """This rank's rows of `full`, a tensor drawn for the global batch."""
        if self.size == 1:
            return full
        local = full.shape[0] // (blocks * self.size)
        return full[self.rows(local, blocks).to(full.device)]

    def randn(self, local_shape: tuple[int, ...], generator: torch.Generator | None, **kw) -> torch.Tensor:
        """Standard normal noise for this rank's rows: drawn for the global batch, then taken."""
        full = torch.randn((local_shape[0] * self.size, *local_shape[1:]), generator=generator, **kw)
        return self.take(full)

    def randint(self, high: int, local: int, generator: torch.Generator | None, blocks: int = 1) -> list[int]:
        """`local` integers in [0, high) for this rank's rows (of `blocks` blocks, see `rows`), drawn
        for the global batch."""
        return self.take(torch.randint(high, (local * self.size,), generator=generator), blocks).tolist()


ONE = Shard()
