"""Every registered reward builds (from tiny local models where it needs weights) and scores a batch;
an unknown name lists the valid ones."""
from __future__ import annotations

import warnings

import pytest
import torch

from alignprop_core.rewards import REWARDS, make_reward
# fixtures that write tiny checkpoints with the real key layouts (imported, so pytest uses them here)
from test_rewards_clip import TINY, TINY_768, aesthetic_head, clip_files, pickscore_dir, tiny_archs  # noqa: F401
from test_rewards_detect_mix import detector_dirs  # noqa: F401


@pytest.fixture(scope="module")
def factory_kwargs(clip_files, aesthetic_head, pickscore_dir, detector_dirs):  # noqa: F811
    return {
        "aesthetic": dict(head_path=aesthetic_head, clip_checkpoint=clip_files["tiny768"], clip_arch=TINY_768),
        "hps": dict(checkpoint=clip_files["hps"], arch=TINY),
        "pickscore": dict(model_dir=pickscore_dir),
        "clip_score": dict(arch=TINY, checkpoint=clip_files["tiny"]),
        "jpeg_compressibility": {},
        "jpeg_incompressibility": {},
        "object_count": dict(model_dir=detector_dirs["owlvit"], object_name="cat", target=2),
        "color_target": {},
        "smoothness": {},
        "colourfulness": {},
        "toy_count": dict(attributes=["count", "colour"]),  # the committed toy classifier
        "toy_blobs": {},  # weight-free: counts blobs
        "mixture": dict(spec="smoothness:1, jpeg_compressibility:0.5[toward=-1]", standardize=True),
    }


def test_every_registered_reward_builds_and_scores(factory_kwargs):
    assert set(factory_kwargs) == set(REWARDS), "give every registered reward a tiny build here"
    g = torch.Generator().manual_seed(0)
    for name in sorted(REWARDS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the test-made aesthetic head fails the md5 check
            reward = make_reward(name, **factory_kwargs[name])
        images = torch.rand(2, 3, 64, 64, generator=g).requires_grad_(True)
        # the toy rewards read the toy world's captions; every other reward takes any text
        prompts = (["two red circles on a black background", "one blue square"] if name.startswith("toy_")
                   else ["a photo of a cat", "a dog on grass"])
        scores = reward(images, prompts)
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
        if not reward.differentiable:  # a judge only (toy_blobs): the trainer refuses to train on it
            assert not scores.requires_grad, name
            continue
        scores.sum().backward()
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0, name


def test_unknown_reward_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_reward("aesthetics_v9")
    assert "aesthetics_v9" in str(err.value)
    for name in REWARDS:
        assert name in str(err.value)
