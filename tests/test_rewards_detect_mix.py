"""Object-count reward on tiny random OWL-ViT / OWLv2 detectors, and reward mixtures.

The detectors use the real transformers classes with tiny widths, saved to temp folders with an
offline-built CLIP tokenizer and the official processors, then loaded through `make_object_count`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_core.rewards.color import make_color_target
from alignprop_core.rewards.mixture import make_mixture, mixture_from_spec, parse_mixture
from alignprop_core.rewards.object_count import (make_object_count, object_from_prompt,
                                                 preprocess_images, soft_count)
from alignprop_core.rewards.smoothness import make_smoothness

KINDS = ("owlvit", "owlv2")
SIZE = 64  # detector input side; patch 16 -> 16 boxes per image


def _save_tiny_detector(kind: str, folder) -> None:
    from transformers import (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor,
                              OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor)

    from alignprop_core.models.tiny_model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=16)
    config_cls, model_cls, proc_cls, image_proc_cls = {
        "owlvit": (OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor, OwlViTImageProcessor),
        "owlv2": (Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor, Owlv2ImageProcessor),
    }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config_cls(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    image_proc = image_proc_cls(size={"height": SIZE, "width": SIZE})
    proc_cls(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory):
    dirs = {}
    for kind in KINDS:
        dirs[kind] = tmp_path_factory.mktemp(kind)
        _save_tiny_detector(kind, dirs[kind])
    return dirs


def _reference(kind: str, folder):
    """The model and processor loaded the way transformers users load them."""
    from transformers import AutoProcessor, Owlv2ForObjectDetection, OwlViTForObjectDetection

    model_cls = OwlViTForObjectDetection if kind == "owlvit" else Owlv2ForObjectDetection
    model = model_cls.from_pretrained(folder, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(folder, local_files_only=True)


def _uint8_images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    # Smooth-ish content (low-res noise upsampled) so resizing is not all aliasing.
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(2, h // 8), max(2, w // 8), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = (img + 0.15 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


def _official_pixels(processor, arr: np.ndarray) -> torch.Tensor:
    """pixel_values from the official image processor, fed PIL images as users do."""
    images = [Image.fromarray(a) for a in arr]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _to_float(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------- object count


@pytest.mark.parametrize("kind", KINDS)
def test_object_count_shape_and_pixel_gradient(detector_dirs, kind):
    reward = make_object_count(detector_dirs[kind], "cat", target=2.0)
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    out = reward(images, ["a cat", "two cats"])
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out <= 0).all()
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_owlvit_preprocessing_matches_processor(detector_dirs):
    reward = make_object_count(detector_dirs["owlvit"], "cat", target=1.0)
    _, processor = _reference("owlvit", detector_dirs["owlvit"])
    arr = _uint8_images(2, 56, 80)
    ours = preprocess_images(_to_float(arr), reward.preprocess)
    # User path: PIL uint8 in, resized in uint8 (two passes, each rounded) -> we differ by the
    # rounding only: at most ~1/255 before normalisation, ~1/3 of that on average (two roundings).
    ref = _official_pixels(processor, arr)
    assert ours.shape == ref.shape == (2, 3, SIZE, SIZE)
    level = 1 / 255 / min(reward.preprocess.std)  # one uint8 level in normalised units
    torch.testing.assert_close(ours, ref, rtol=0, atol=1.05 * level)
    assert (ours - ref).abs().mean() < 0.4 * level


def test_owlv2_preprocessing_matches_processor(detector_dirs):
    import transformers

    reward = make_object_count(detector_dirs["owlv2"], "cat", target=1.0)
    _, processor = _reference("owlv2", detector_dirs["owlv2"])
    # Square input: no padding; 160 -> 64 exercises the Gaussian anti-aliasing (sigma 0.75, 7 taps).
    arr = _uint8_images(2, 160, 160)
    ref = _official_pixels(processor, arr)
    torch.testing.assert_close(preprocess_images(_to_float(arr), reward.preprocess), ref, rtol=0, atol=1e-5)
    # Non-square input: padded at the bottom/right. transformers 5 pads with 0.0, 4.x with 0.5.
    installed_pad = 0.0 if int(transformers.__version__.split(".")[0]) >= 5 else 0.5
    spec = dataclasses.replace(reward.preprocess, pad_value=installed_pad)
    arr = _uint8_images(1, 112, 160, seed=1)
    ref = _official_pixels(processor, arr)
    torch.testing.assert_close(preprocess_images(_to_float(arr), spec), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_soft_count_matches_reference_model(detector_dirs, kind):
    model, processor = _reference(kind, detector_dirs[kind])
    arr = _uint8_images(2, 72, 72, seed=2)
    inputs = processor(text=["a photo of a cat"] * 2, images=[Image.fromarray(a) for a in arr],
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    expected = torch.sigmoid(out.logits).sum(dim=(1, 2))  # (B,) expected count, one query per image

    plain = make_object_count(detector_dirs[kind], "cat", target=0.0, threshold=None, temperature=1.0)
    with torch.no_grad():
        ours = plain.count(inputs["pixel_values"], plain.queries(["x", "y"], 2))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)

    # A very cold soft threshold counts exactly the boxes that post-processing keeps at 0.1.
    cold = make_object_count(detector_dirs[kind], "cat", target=0.0, threshold=0.1, temperature=1e-4)
    kept = processor.image_processor.post_process_object_detection(out, threshold=0.1)
    with torch.no_grad():
        counts = cold.count(inputs["pixel_values"], cold.queries(["x", "y"], 2))
    assert counts.tolist() == pytest.approx([float(len(k["scores"])) for k in kept], abs=1e-3)


def test_object_name_from_prompt(detector_dirs):
    assert object_from_prompt("A photo of three Cats.") == "cats"
    fixed = make_object_count(detector_dirs["owlvit"], "cat", target=1.0)
    from_prompt = make_object_count(detector_dirs["owlvit"], None, target=1.0)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(from_prompt(images, ["one cat", "a dog and a cat"]),
                               fixed(images, ["x", "y"]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="last word"):
        from_prompt(images, ["one cat", "123 !!"])


def test_soft_count_formula():
    logits = torch.tensor([[[0.0], [math.log(0.1 / 0.9)], [-50.0]]])  # (1, 3 boxes, 1 query)
    assert soft_count(logits, None, 1.0).item() == pytest.approx(0.5 + 0.1)
    # threshold 0.1 puts the step at logit(0.1): that box counts 1/2, the logit-0 box sigmoid(log 9 / T).
    at_zero = 1 / (1 + math.exp(-math.log(9) / 0.25))
    assert soft_count(logits, 0.1, 0.25).item() == pytest.approx(at_zero + 0.5)


def test_object_count_bad_inputs(detector_dirs, tmp_path):
    missing = tmp_path / "no_such_owl"
    with pytest.raises(FileNotFoundError, match="no_such_owl"):
        make_object_count(missing, "cat", target=1.0)
    partial = tmp_path / "partial_owl"
    partial.mkdir()
    shutil.copy(detector_dirs["owlvit"] / "config.json", partial)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        make_object_count(partial, "cat", target=1.0)
    wrong = tmp_path / "wrong_type"
    shutil.copytree(detector_dirs["owlvit"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type 'clip'"):
        make_object_count(wrong, "cat", target=1.0)
    for name in ("", "   "):
        with pytest.raises(ValueError, match="object_name"):
            make_object_count(detector_dirs["owlvit"], name, target=1.0)
    with pytest.raises(ValueError, match="target"):
        make_object_count(detector_dirs["owlvit"], "cat", target=-1.0)
    reward = make_object_count(detector_dirs["owlvit"], "cat", target=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.rand(1, 3, 32, 32) * 2 - 1, ["a cat"])


# ---------------------------------------------------------------- mixture


def _mean(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _mean_sq(images, prompts):
    return images.pow(2).mean(dim=(1, 2, 3))


def _scripted(batches):
    """A reward that returns the given per-batch values, in order (for hand-checked statistics)."""
    it = iter(batches)

    def fn(images, prompts):
        return torch.tensor(next(it), dtype=torch.float32)

    return fn


def test_mixture_weights_combine_exactly():
    images = torch.rand(3, 3, 8, 8)
    mix = make_mixture([(_mean, 2.0), (_mean_sq, -0.5)])
    expected = 2.0 * _mean(images, None) + -0.5 * _mean_sq(images, None)
    torch.testing.assert_close(mix(images, ["p"] * 3), expected, rtol=0, atol=1e-7)
    target = make_mixture([(_mean, 1.0, ("target", 10.0))])
    torch.testing.assert_close(target(images, ["p"] * 3), -(10.0 - _mean(images, None)).abs(), rtol=0, atol=0)


def test_mixture_standardization_running_stats_by_hand():
    images = torch.rand(2, 3, 4, 4)
    # Component 1 maximised; component 2 pulled toward 10 (its shaped values are -|10 - r|).
    mix = make_mixture([(_scripted([[1.0, 3.0], [5.0, 5.0]]), 1.0),
                        (_scripted([[9.0, 13.0], [10.0, 10.0]]), 2.0, ("target", 10.0))],
                       standardize=True, momentum=0.5, eps=1e-6)
    # Batch 1 initialises: c1 = [1, 3] -> mean 2, var 1; c2 = [-1, -3] -> mean -2, var 1.
    out1 = mix(images, ["p", "p"])
    torch.testing.assert_close(out1, torch.tensor([(-1 + 2 * 1) / (1 + 1e-6), (1 + 2 * -1) / (1 + 1e-6)]))
    assert mix.stats.mean == [2.0, -2.0] and mix.stats.var == [1.0, 1.0]
    # Batch 2: c1 = [5, 5] (delta 3), c2 = [0, 0] (delta 2); mean += 0.5 * delta,
    # var = 0.5 * (var + 0.5 * delta^2) + 0.5 * batch_var.
    out2 = mix(images, ["p", "p"])
    assert mix.stats.mean == pytest.approx([3.5, -1.0])
    assert mix.stats.var == pytest.approx([2.75, 1.5])
    z1 = (5 - 3.5) / (math.sqrt(2.75) + 1e-6)
    z2 = (0 - -1.0) / (math.sqrt(1.5) + 1e-6)
    torch.testing.assert_close(out2, torch.full((2,), z1 + 2 * z2))

    # The statistics round-trip through a training state and can be frozen for evaluation.
    frozen = make_mixture([(_scripted([[5.0, 5.0]]), 1.0),
                           (_scripted([[10.0, 10.0]]), 2.0, ("target", 10.0))], standardize=True)
    frozen.load_state_dict(mix.state_dict())
    frozen.update_stats = False
    torch.testing.assert_close(frozen(images, ["p", "p"]), out2)
    assert frozen.stats.batches == 2


def test_mixture_gradients_reach_pixels_through_all_components(detector_dirs):
    count = make_object_count(detector_dirs["owlvit"], "cat", target=1.0, threshold=None, temperature=1.0)
    color, smooth = make_color_target(), make_smoothness()
    components = [(color, 1.0), (smooth, 0.5), (count, 0.25)]
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a cat", "a cat"]

    def grad(fn):
        x = images.clone().requires_grad_(True)
        fn(x, prompts).sum().backward()
        return x.grad

    parts = [w * grad(fn) for fn, w in components]
    assert all(p.abs().sum() > 0 for p in parts)
    torch.testing.assert_close(grad(make_mixture(components)), sum(parts), rtol=1e-4, atol=1e-7)
    g = grad(make_mixture(components, standardize=True))
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def _make_aesthetic(model_path: str = "", scale: float = 1.0):
    return _mean


def _make_jpeg(quality: int = 80):
    return _mean_sq


FACTORIES = {"aesthetic": _make_aesthetic, "jpeg_compressibility": _make_jpeg}


def test_parse_mixture_parses_and_validates():
    assert parse_mixture("aesthetic:1.0, jpeg_compressibility:0.5", FACTORIES) == [
        ("aesthetic", 1.0, {}), ("jpeg_compressibility", 0.5, {})]
    assert parse_mixture(" aesthetic [toward=10; scale=2.5] ,jpeg_compressibility:-1e-1[quality=90]",
                         FACTORIES) == [("aesthetic", 1.0, {"toward": 10, "scale": 2.5}),
                                        ("jpeg_compressibility", -0.1, {"quality": 90})]
    with pytest.raises(ValueError, match="aesthetic, jpeg_compressibility"):
        parse_mixture("aesthetic:1, hps:2", FACTORIES)
    with pytest.raises(ValueError, match="'abc'.*'jpeg_compressibility'"):
        parse_mixture("aesthetic:1, jpeg_compressibility:abc", FACTORIES)
    with pytest.raises(ValueError, match="quality"):
        parse_mixture("jpeg_compressibility:1[qualty=3]", FACTORIES)
    for bad in ("", "aesthetic:1,", "aesthetic:", "aesthetic:1[scale]", "aesthetic:nan"):
        with pytest.raises(ValueError):
            parse_mixture(bad, FACTORIES)

    images = torch.rand(2, 3, 8, 8)
    mix = mixture_from_spec("aesthetic:1.0[toward=10], jpeg_compressibility:0.5", FACTORIES)
    expected = -(10 - _mean(images, None)).abs() + 0.5 * _mean_sq(images, None)
    torch.testing.assert_close(mix(images, ["p", "p"]), expected, rtol=0, atol=1e-7)


def test_standardized_mixture_with_a_first_batch_of_one_stays_finite_and_small():
    from alignprop_core.rewards.mixture import make_mixture

    mix = make_mixture([(_mean, 1.0), (_mean_sq, 1.0)], standardize=True)
    first = mix(torch.full((1, 3, 4, 4), 0.3), ["a"])
    assert torch.isfinite(first).all() and first.abs().max() < 1e-3  # centred, not divided by 0
    second = mix(torch.full((1, 3, 4, 4), 0.6), ["a"])
    assert torch.isfinite(second).all() and second.abs().max() < 100
