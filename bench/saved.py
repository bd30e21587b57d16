"""Bytes of tensors autograd saves for backward, counted with `torch.autograd.graph.saved_tensors_hooks`.

Each saved tensor is counted once per storage; storages of model parameters and buffers are left out
(saving a frozen weight for backward costs no memory, it is only a reference).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch


@dataclass
class SavedCounter:
    """Running total of distinct storages saved for backward."""

    exclude: set[int] = field(default_factory=set)  # storage pointers that cost nothing (weights)
    seen: set[int] = field(default_factory=set)
    bytes: int = 0
    tensors: int = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
            self.tensors += 1
        return t


def weight_pointers(modules: Iterable[torch.nn.Module]) -> set[int]:
    """Storage pointers of every parameter and buffer of `modules`."""
    ptrs = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


@contextmanager
def count_saved(exclude: set[int]) -> Iterator[SavedCounter]:
    """Count what autograd saves inside the block."""
    counter = SavedCounter(exclude=exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter
