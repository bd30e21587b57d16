"""The toy world: the shapes generator draws what its captions say, the committed classifier reads
it, the committed model draws the requested counts better than chance, and AlignProp on it raises
the held-out count reward."""
from __future__ import annotations

import json

import pytest
import torch
from scipy import ndimage

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import diffusers_backend
from alignprop_core.files.prompts import shipped_prompts
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.sampler import sample_images
from alignprop_core.models.t2i_model import load_t2i_model
from alignprop_core.toy import toy_model_dir
from alignprop_core.toy.classifier import HEADS, accuracy, load_classifier
from alignprop_core.toy.counting import count_shapes, foreground_mask, label_components
from alignprop_core.toy.networks import build_tokenizer
from alignprop_core.toy.pretrain import INFO_FILE, PretrainConfig, crowded_dataset, run
from alignprop_core.toy.shapes import (BACKGROUNDS, COLOURS, COUNT_WORDS, VOCABULARY, caption_for,
                                       generate, parse_caption, split_prompts)
from alignprop_core.training.evaluate import evaluate
from alignprop_core.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_t2i_model(toy_model_dir())


@pytest.fixture(scope="module")
def reward():
    return make_reward("toy_count")


def _shifted(prompt: str, by: int = 2) -> str:
    """The same prompt asking for another count."""
    p = parse_caption(prompt)
    return caption_for((p["count"] - 1 + by) % len(COUNT_WORDS) + 1, p["colour"], p["shape"],
                       p["background"])


def test_generator_is_a_function_of_the_seed():
    a, scenes_a = generate(12, seed=7)
    b, scenes_b = generate(12, seed=7)
    c, _ = generate(12, seed=8)
    assert torch.equal(a, b) and scenes_a == scenes_b
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32) and a.min() >= 0 and a.max() <= 1


def test_captions_match_the_drawn_pixels():
    images, scenes = generate(60, seed=11)
    assert {s.count for s in scenes} == {1, 2, 3, 4}
    for image, scene in zip(images, scenes):
        p = parse_caption(scene.caption)
        bg = torch.tensor(BACKGROUNDS[p["background"]]).view(3, 1, 1)
        distance = (image - bg).norm(dim=0)
        background = distance < 0.12  # the colour jitter moves each channel by at most 0.06
        assert background.float().mean() > 0.4, scene.caption
        mean_bg = image[:, background].mean(1)
        assert min(BACKGROUNDS, key=lambda n: (torch.tensor(BACKGROUNDS[n]) - mean_bg).norm()) == p["background"]
        fg_rgb = torch.tensor(scene.colour_rgb).view(3, 1, 1)
        foreground = distance > 0.5 * (fg_rgb - bg).norm()
        _, components = ndimage.label(foreground.numpy())
        assert components == p["count"], scene.caption
        mean_fg = image[:, foreground].mean(1)
        nearest = min(COLOURS, key=lambda n: (torch.tensor(COLOURS[n]) - mean_fg).norm())
        assert nearest == p["colour"], scene.caption
        assert scene.caption == caption_for(scene.count, scene.colour, scene.shape, scene.background)


def test_shipped_prompt_lists_are_the_grammar_split_with_disjoint_combinations():
    train_prompts, held_out = split_prompts()
    assert shipped_prompts("toy_train") == train_prompts, "regenerate alignprop_core/data/toy_train.txt"
    assert shipped_prompts("toy_eval") == held_out, "regenerate alignprop_core/data/toy_eval.txt"
    combo = lambda s: tuple(parse_caption(s)[k] for k in ("count", "colour", "shape"))  # noqa: E731
    assert {combo(p) for p in train_prompts}.isdisjoint({combo(p) for p in held_out})
    assert {parse_caption(p)["count"] for p in held_out[:8]} == {1, 2, 3, 4}
    tokenizer = build_tokenizer()
    assert all(len(tokenizer.tokenize(w)) == 1 for w in VOCABULARY)


def test_classifier_reads_fresh_images():
    images, scenes = generate(400, seed=98765)  # a seed the pretraining never drew
    labels = torch.tensor([s.labels for s in scenes])
    acc = accuracy(load_classifier(), images, labels)
    assert set(acc) == set(HEADS)
    assert acc["count"] > 0.95 and acc["colour"] > 0.95 and acc["shape"] > 0.9, acc


def test_classifier_counts_touching_shapes_as_separate_blobs():
    """Merged shapes must read as one: the model's usual mistake. A classifier trained on clean
    drawings only (the first committed one) scored 0.83 here and rewarded merges."""
    images, labels = crowded_dataset(400, seed=97531, size=32)  # a seed the pretraining never drew
    acc = accuracy(load_classifier(), images.float() / 255, labels)
    assert acc["count"] > 0.86, acc


def test_count_reward_prefers_the_requested_count_and_has_pixel_gradients(reward):
    images, scenes = generate(16, seed=4321)
    prompts = [s.caption for s in scenes]
    x = images.clone().requires_grad_(True)
    matched = reward(x, prompts)
    matched.sum().backward()
    assert matched.shape == (16,) and (matched <= 0).all()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    mismatched = reward(images, [_shifted(p) for p in prompts])
    assert (matched.detach() > mismatched).float().mean() > 0.9
    prob = make_reward("toy_count", kind="prob")(images, prompts)
    assert torch.allclose(prob, matched.detach().exp(), atol=1e-6)
    soft = make_reward("toy_count", kind="prob", temperature=4.0)(images, prompts)
    assert (soft - 0.25).abs().max() < (prob - 0.25).abs().max()  # a temperature softens
    with pytest.raises(ValueError, match="name the count"):
        reward(images[:1], ["a red circle"])


def test_colourfulness_ranks_grey_below_colour():
    colourful = make_reward("colourfulness")
    images, scenes = generate(4, seed=1)
    grey = images.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    prompts = [s.caption for s in scenes]
    assert (colourful(images, prompts) > colourful(grey, prompts) + 0.05).all()


def test_committed_weights_are_small_documented_and_safetensors():
    folder = toy_model_dir()
    weights = list(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} >= {"unet", "vae", "text_encoder", "toy_world"}
    assert not list(folder.rglob("*.bin"))
    assert sum(w.stat().st_size for w in weights) <= 20 * 2 ** 20
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["command"].startswith("python -m alignprop_core.toy.pretrain")
    assert info["seed"] == info["config"]["seed"] and info["total_seconds"] > 0


def test_toy_model_opens_in_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_model_dir(), safety_checker=None,
                                                   local_files_only=True)
    out = pipe("two red circles on a white background", num_inference_steps=2, height=32, width=32,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)


def test_pretrained_model_draws_the_requested_count_better_than_chance(model, reward):
    """Fails with random or untrained weights: chance count accuracy is 1/4 and matched prompts
    would score no better than mismatched ones."""
    backend = diffusers_backend(model)
    _, held_out = split_prompts()
    prompts = held_out[:24]
    x_T = torch.randn(backend.latent_shape(len(prompts), 32, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        images = sample_images(backend, prompts, SamplerConfig(steps=15, guidance_scale=4.0), x_T)
        matched = reward(images, prompts)
        mismatched = reward(images, [_shifted(p) for p in prompts])
    report = reward.report(images, prompts)
    assert report["count_accuracy"] > 0.4, report
    assert report["colour_accuracy"] > 0.7 and report["shape_accuracy"] > 0.6, report
    assert matched.mean() > mismatched.mean() + 2.0


@pytest.mark.xfail(strict=True, reason="known gap: 12-20 AlignProp steps do not reliably "
                   "raise the held-out count reward (lr 1.5e-3: -2.045 -> -2.062 here, T=10 K 3-6 "
                   "20 steps: -2.856 -> -2.823); the demo's 50 steps do (slow test_cli::"
                   "test_demo_raises_the_held_out_reward). Remove this marker once a short setting does")
def test_short_alignprop_run_raises_the_held_out_count_reward(model, reward):
    backend = diffusers_backend(load_t2i_model(toy_model_dir()))
    train_prompts, held_out = split_prompts()
    sampler = SamplerConfig(steps=6, guidance_scale=4.0, k=3)
    cfg = TrainConfig(reward="toy_count", steps=12, batch_size=4, lr=3e-3, width=32, height=32,
                      eval_every=0, eval_batch_size=12)
    result = train(backend, reward, train_prompts, held_out[:12], sampler, LoraConfig(rank=4, alpha=4.0), cfg)
    start, end = result.evals[0]["eval_reward"], result.evals[-1]["eval_reward"]
    assert end > start + 0.05, (start, end)
    with torch.no_grad():
        scores, _ = evaluate(backend, reward, held_out[:12], sampler, cfg)
    assert sum(scores) / len(scores) == pytest.approx(end, abs=1e-5)


def test_pretraining_is_reproducible(tmp_path):
    tiny = dict(dataset_size=32, check_images=8, vae_steps=2, classifier_steps=2, unet_steps=2, eval_samples=4,
                eval_sampler_steps=2, vae_batch_size=4, classifier_batch_size=4, unet_batch_size=4,
                log_every=100, save_every=0, stages=("vae", "classifier", "unet"))
    from safetensors.torch import load_file

    for name in ("a", "b"):
        run(PretrainConfig(out=str(tmp_path / name), **tiny))
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "classifier.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_shape_counter_counts_fresh_drawings_exactly_and_agrees_with_scipy():
    images, scenes = generate(300, seed=2468)
    counts = count_shapes(images)
    assert counts.tolist() == [s.count for s in scenes]
    for image in images[:40]:  # the blob labelling itself equals scipy's 8-connected labelling
        mask = foreground_mask(image[None])[0]
        _, n = ndimage.label(mask.numpy(), structure=[[1, 1, 1]] * 3)
        assert label_components(mask[None])[0].unique().numel() - 1 == n


def test_shape_counter_sees_merged_shapes_and_ignores_specks():
    images, scenes = generate(40, seed=1357)
    i = next(k for k, s in enumerate(scenes) if s.count == 2)
    image = images[i].clone()
    (x0, y0), (x1, y1) = scenes[i].centres
    colour = torch.tensor(scenes[i].colour_rgb).view(3, 1)
    for t in torch.linspace(0, 1, 200):  # paint a thick bridge between the two shapes: one blob
        x, y = int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))
        image[:, y - 1:y + 2, x - 1:x + 2] = colour.view(3, 1, 1)
    assert int(count_shapes(image[None])) == 1
    speck = images[i].clone()
    corner = (speck[:, 1:3, 1:3] * 0 + colour.view(3, 1, 1))  # 4 px of shape colour in a corner
    speck[:, 1:3, 1:3] = corner
    assert int(count_shapes(speck[None])) == 2
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        count_shapes(images[0])
