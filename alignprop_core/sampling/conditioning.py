"""Batching conditionings whose token sequences differ in length (prompts over 75 CLIP tokens).

A text encoder gives a long prompt more context tokens (CLIP: 77 per 75-token chunk), so the
prompt and the negative prompt, or two prompts of one batch, can have contexts of different
lengths L. Cross-attention is unchanged when its key/value tokens are repeated n times (each
softmax weight and its normaliser both gain the factor n), so contexts are repeated to the least
common multiple of their lengths and then concatenated along the batch, as ComfyUI's
``CONDCrossAttn.concat`` does. Like ComfyUI, the two branches of classifier-free guidance are
batched only while that costs at most `MAX_BATCH_REPEAT` times the shortest context
(`can_batch`); otherwise the caller runs them as separate denoiser calls, which is equivalent.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..models.backend import Cond

MAX_BATCH_REPEAT = 4  # ComfyUI's own limit: lcm / shortest length above this runs separately
MAX_LCM_FACTOR = 10  # a batch that must be one tensor: lcm above this times the longest is refused


def token_lcm(lengths: Sequence[int]) -> int:
    """Least common multiple of token-sequence lengths: the length every sequence is repeated to."""
    return math.lcm(*lengths)


def concat_token_sequences(tensors: Sequence[torch.Tensor], name: str = "context") -> torch.Tensor:
    """Concatenate (B_i, L_i, D) token sequences along the batch, each repeated to lcm(L_i) tokens.

    Args:
        tensors: contexts with equal D and any lengths L_i.
        name: what the tensors are, for error messages.

    Returns:
        (sum B_i, lcm(L_i), D); cross-attention over each row gives what it gives on the original.

    Raises:
        ValueError: if D differs, or if lcm(L_i) exceeds `MAX_LCM_FACTOR` times the longest L_i.
    """
    dims = {t.shape[2] for t in tensors}
    if len(dims) != 1:
        raise ValueError(f"{name} tensors have different feature sizes {sorted(dims)}; every "
                         "conditioning of one batch must come from the same text encoder.")
    lengths = [t.shape[1] for t in tensors]
    lcm = token_lcm(lengths)
    if lcm > MAX_LCM_FACTOR * max(lengths):
        raise ValueError(f"the prompts of one batch encode to {', '.join(map(str, sorted(set(lengths))))} "
                         f"{name} tokens; batching them repeats each to their least common multiple, "
                         f"{lcm} tokens, over {MAX_LCM_FACTOR}x the longest; shorten the longest prompts "
                         "or sample fewer prompts per batch (batch size 1 always works).")
    return torch.cat([t.repeat(1, lcm // t.shape[1], 1) for t in tensors])


def can_batch(conds: Sequence[Cond]) -> bool:
    """Whether ComfyUI would batch these conditionings: token-length lcm at most
    `MAX_BATCH_REPEAT` times the shortest length of every 3-D entry (mismatched keys or ranks
    say True, so that `batch_conds` reports them)."""
    if any(c.keys() != conds[0].keys() for c in conds):
        return True
    for key, value in conds[0].items():
        if all(c[key].dim() == 3 for c in conds):
            lengths = [c[key].shape[1] for c in conds]
            if token_lcm(lengths) > MAX_BATCH_REPEAT * min(lengths):
                return False
    return True


def batch_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch.

    3-D (B, L, D) entries may differ in L and are repeated to the lcm of their lengths
    (`concat_token_sequences`); entries of any other rank must match in every dimension but the first.

    Raises:
        ValueError: if the conditionings have different keys or mismatched shapes.
    """
    keys = conds[0].keys()
    for other in conds[1:]:
        if other.keys() != keys:
            raise ValueError(f"conditioning keys differ: {sorted(conds[0])} vs {sorted(other)}; "
                             "encode every prompt with the same model.")
    out = {}
    for key in keys:
        values = [c[key] for c in conds]
        if all(v.dim() == 3 for v in values):
            out[key] = concat_token_sequences(values, key)
            continue
        shapes = {tuple(v.shape[1:]) for v in values}
        if len({v.dim() for v in values}) != 1 or len(shapes) != 1:
            raise ValueError(f"conditioning {key!r} has shapes {[tuple(v.shape) for v in values]} that "
                             "cannot be batched: only (B, L, D) token sequences may differ (in L); "
                             "encode every prompt with the same model and settings.")
        out[key] = torch.cat(values)
    return out
