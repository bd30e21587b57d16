"""Reward augmentation (alignprop_core.training.augment and TrainConfig.reward_augment): each training image
goes through one random mirror / quarter turn before the reward, the gradient comes back through
the inverse, runs stay reproducible, and nothing changes when it is off."""
from __future__ import annotations

import pytest
import torch

from alignprop_core.training.augment import augment_for_reward
from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import lora_state_dict
from alignprop_core.training.trainer import train
from tiny_models import make_backend

PROMPTS = ["a cat", "a dog", "a horse", "a cow"]


def _dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    turns = [torch.rot90(image, t, dims=(-2, -1)) for t in range(4)]
    return turns + [t.flip(-1) for t in turns]


def _which(out: torch.Tensor, image: torch.Tensor) -> int:
    matches = [i for i, view in enumerate(_dihedral(image)) if torch.equal(view, out)]
    assert len(matches) == 1, "the output is not exactly one of the 8 views"
    return matches[0]


def test_dihedral_gives_each_image_one_of_the_eight_views_and_all_of_them_occur():
    images = torch.rand(200, 3, 6, 6)  # random pixels: the 8 views of an image all differ
    out = augment_for_reward(images, "dihedral", torch.Generator().manual_seed(0))
    seen = [_which(o, i) for o, i in zip(out, images)]
    assert set(seen) == set(range(8))
    assert seen.count(0) < 60  # not mostly the identity (expected 25 of 200)


def test_hflip_only_mirrors_left_right_and_none_is_the_identity_without_a_draw():
    images = torch.rand(100, 3, 4, 6)  # hflip takes any aspect
    out = augment_for_reward(images, "hflip", torch.Generator().manual_seed(0))
    views = [_which(o, i) if o.shape == i.shape else -1 for o, i in zip(out, images)]
    kinds = {"same" if torch.equal(o, i) else "mirror" if torch.equal(o, i.flip(-1)) else "other"
             for o, i in zip(out, images)}
    assert kinds == {"same", "mirror"} and -1 not in views
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    assert augment_for_reward(images, "none", gen) is images
    assert torch.equal(gen.get_state(), state)  # runs without augmentation keep their random stream


def test_the_gradient_reaches_each_image_through_the_inverse_transform():
    x = torch.rand(16, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(16, 3, 5, 5, dtype=torch.float64)
    out = augment_for_reward(x, "dihedral", torch.Generator().manual_seed(1))
    (out * w).sum().backward()
    for i in range(16):
        view = _which(out[i].detach(), x[i].detach())
        # the gradient is w taken back by the inverse view: applying the view to it gives w again
        assert torch.equal(_dihedral(x.grad[i])[view], w[i])
    # and it is autograd's gradient of a linear map: <grad, x> equals the function's value
    assert torch.allclose((x.grad * x).sum(), (out * w).sum())


def test_bad_kinds_and_shapes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="'spin' is not known; use one of none, hflip, dihedral"):
        augment_for_reward(torch.rand(1, 3, 4, 4), "spin", torch.Generator())
    with pytest.raises(ValueError, match="needs square images, not 6x4; use 'hflip'"):
        augment_for_reward(torch.rand(1, 3, 4, 6), "dihedral", torch.Generator())
    with pytest.raises(ValueError, match="reward_augment='dihedral' .* not 32x16"):
        TrainConfig(reward_augment="dihedral", width=32, height=16)
    with pytest.raises(ValueError, match="reward_augment='flip' is not known"):
        TrainConfig(reward_augment="flip")


def _corner_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Brightness of the top-left quarter: a reward that sees orientation."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    return images[..., :h, :w].mean(dim=(1, 2, 3))


def _mean_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Mean brightness: a reward that no mirror or turn can change."""
    return images.mean(dim=(1, 2, 3))


def _train(reward, augment: str, steps: int = 1):
    backend = make_backend(torch.float32)
    sampler = SamplerConfig(steps=3, guidance_scale=2.0, truncation="fixed", k=2)
    cfg = TrainConfig(reward="custom", steps=steps, batch_size=4, lr=1e-2, width=16, height=16,
                      eval_every=0, seed=0, reward_augment=augment)
    result = train(backend, reward, PROMPTS, PROMPTS[:2], sampler, LoraConfig(rank=2, alpha=2.0), cfg)
    return lora_state_dict(backend.lora_target), result.history


def test_training_scores_augmented_images_only_where_the_reward_can_tell():
    # an invariant reward: the first step's reward and LoRA update are the same with or without it
    plain, h_plain = _train(_mean_reward, "none")
    aug, h_aug = _train(_mean_reward, "dihedral")
    assert h_plain[0]["reward"] == pytest.approx(h_aug[0]["reward"], rel=1e-6)
    assert all(torch.allclose(plain[k], aug[k], atol=1e-6) for k in plain)
    # an orientation-dependent reward: the augmentation changes what is learned
    plain, _ = _train(_corner_reward, "none")
    aug, _ = _train(_corner_reward, "dihedral")
    assert max(float((plain[k] - aug[k]).abs().max()) for k in plain) > 1e-5
    # same seed, same LoRA
    again, _ = _train(_corner_reward, "dihedral")
    assert all(torch.equal(aug[k], again[k]) for k in aug)
