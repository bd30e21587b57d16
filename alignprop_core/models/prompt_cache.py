"""Text conditioning computed once per distinct prompt.

Training samples the same prompts (and the same negative prompt) again and again; the text encoders
are frozen, so each prompt's conditioning is a constant. `cached_encoder` wraps a batch encoder so
that every prompt is encoded the first time it is seen and looked up afterwards. The cache holds at
most `capacity` prompts and drops the least recently used one beyond that: a FLUX.1 prompt is a
512 x 4096 T5 sequence (4 MiB in bf16), so an unbounded cache over a long prompt file would hold
gigabytes of device memory.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from .backend import Cond

DEFAULT_CAPACITY = 256  # prompts kept; a training prompt file of a few hundred lines stays cached


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list; ValueError for a bare string, an empty list or a non-string entry."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}; "
                         "wrap a single prompt as [prompt].")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}.")
    return list(prompts)


def cached_encoder(encode_batch: Callable[[list[str]], Cond],
                   capacity: int = DEFAULT_CAPACITY) -> Callable[[Sequence[str]], Cond]:
    """Wrap `encode_batch` (distinct prompts -> batch-first conditioning) with a per-prompt cache.

    Args:
        encode_batch: encodes a list of prompts to a dict of tensors with the prompts along dim 0;
            it is called without gradient, once per call of the wrapper at most, with only the
            prompts not cached yet.
        capacity: most prompts kept (>= 1).

    Returns:
        prompts -> conditioning dict, batch-first in the order of `prompts` (repeats allowed).
    """
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1 prompt.")
    rows: OrderedDict[str, Cond] = OrderedDict()

    def encode(prompts: Sequence[str]) -> Cond:
        prompts = check_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in rows))
        if missing:
            with torch.no_grad():
                batch = encode_batch(missing)
            for i, prompt in enumerate(missing):
                # clone: a row must not keep the whole batch's storage alive
                rows[prompt] = {key: value[i].clone() for key, value in batch.items()}
        for prompt in prompts:
            rows.move_to_end(prompt)
        cond = {key: torch.stack([rows[p][key] for p in prompts]) for key in rows[prompts[0]]}
        while len(rows) > capacity:
            rows.popitem(last=False)
        return cond

    return encode
