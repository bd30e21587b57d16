"""Conditionings of different token lengths batch the way ComfyUI's CONDCrossAttn does."""
from __future__ import annotations

import pytest
import torch

from alignprop_core.sampling.conditioning import batch_conds, can_batch, concat_token_sequences


def test_contexts_are_repeated_to_the_lcm_of_their_lengths():
    short, long = torch.randn(1, 77, 8), torch.randn(2, 154, 8)
    out = concat_token_sequences([short, long])
    assert out.shape == (3, 154, 8)
    assert torch.equal(out[0, :77], short[0]) and torch.equal(out[0, 77:], short[0])
    assert torch.equal(out[1:], long)
    assert concat_token_sequences([torch.zeros(1, 4, 2), torch.zeros(1, 6, 2)]).shape == (2, 12, 2)


def test_an_absurd_lcm_is_refused_with_the_fix():
    lengths = (77 * 3, 77 * 4, 77 * 5)  # lcm 77 * 60: 12x the longest
    with pytest.raises(ValueError) as err:
        concat_token_sequences([torch.zeros(1, n, 2) for n in lengths])
    assert str(err.value) == (
        "the prompts of one batch encode to 231, 308, 385 context tokens; batching them repeats each "
        "to their least common multiple, 4620 tokens, over 10x the longest; shorten the longest prompts "
        "or sample fewer prompts per batch (batch size 1 always works).")


def test_feature_sizes_must_match():
    with pytest.raises(ValueError, match=r"context tensors have different feature sizes \[4, 8\]"):
        concat_token_sequences([torch.zeros(1, 4, 4), torch.zeros(1, 4, 8)])


def test_batch_conds_repeats_token_sequences_and_concatenates_the_rest():
    a = {"context": torch.randn(1, 4, 3), "y": torch.randn(1, 5)}
    b = {"context": torch.randn(2, 8, 3), "y": torch.randn(2, 5)}
    out = batch_conds([a, b])
    assert out["context"].shape == (3, 8, 3) and torch.equal(out["context"][0, 4:], a["context"][0])
    assert torch.equal(out["y"], torch.cat([a["y"], b["y"]]))


@pytest.mark.parametrize("b, match", [
    ({"context": torch.zeros(1, 4, 3)}, r"conditioning keys differ: \['context', 'y'\] vs \['context'\]"),
    ({"context": torch.zeros(1, 4, 3), "y": torch.zeros(1, 6)},
     r"conditioning 'y' has shapes \[\(1, 5\), \(1, 6\)\] that cannot be batched"),
    ({"context": torch.zeros(1, 4, 3), "y": torch.zeros(1, 5, 1, 1)}, r"conditioning 'y' has shapes"),
])
def test_batch_conds_refuses_what_cannot_be_batched(b, match):
    a = {"context": torch.zeros(1, 4, 3), "y": torch.zeros(1, 5)}
    with pytest.raises(ValueError, match=match):
        batch_conds([a, b])


@pytest.mark.parametrize("lengths, expected", [((77, 77), True), ((77, 154), True), ((77, 308), True),
                                               ((77, 385), False), ((154, 231), True), ((8, 20), False)])
def test_can_batch_follows_comfyuis_limit(lengths, expected):
    """ComfyUI batches two cross-attention conds while lcm / shortest is at most 4."""
    conds = [{"context": torch.zeros(1, n, 2), "y": torch.zeros(1, 3)} for n in lengths]
    assert can_batch(conds) is expected
