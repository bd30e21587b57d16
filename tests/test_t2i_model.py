"""Tests for the diffusers-layout model bundle (t2i_model) and the embedded tiny model (tiny_model)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import pytest
import torch

from alignprop_core.models.t2i_model import (T2IModel, decode_latents, encode_prompts, load_t2i_model,
                                             save_t2i_model)
from alignprop_core.models.tiny_model import build_tiny_model, build_tiny_tokenizer, ensure_tiny_model_dir

NETS = ("text_encoder", "unet", "vae")


def _state(model: T2IModel, net: str) -> dict[str, torch.Tensor]:
    return getattr(model, net).state_dict()


def _same_weights(a: T2IModel, b: T2IModel) -> bool:
    for net in NETS:
        sa, sb = _state(a, net), _state(b, net)
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.fixture(scope="module")
def tiny() -> T2IModel:
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def saved_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_t2i_model(tiny, path)
    return path


def test_build_is_deterministic_in_seed_and_leaves_global_rng(tiny):
    before = torch.random.get_rng_state()
    again = build_tiny_model(seed=0)
    assert torch.equal(before, torch.random.get_rng_state())
    assert _same_weights(tiny, again)
    other = build_tiny_model(seed=1)
    for net in NETS:
        sa, sb = _state(tiny, net), _state(other, net)
        assert any(not torch.equal(sa[k], sb[k]) for k in sa), net


def test_geometry_and_scheduler_config(tiny):
    from diffusers import DDIMScheduler

    assert tiny.vae_scale_factor == 2
    assert tiny.latent_channels == 4
    assert tiny.vae_scaling_factor == pytest.approx(0.18215)
    sched = DDIMScheduler.from_config(tiny.scheduler_config)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.steps_offset == 1
    attn = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        assert isinstance(layer, torch.nn.Linear)


def test_tokenizer_words_unknowns_and_padding(tiny):
    tok = tiny.tokenizer
    ids = tok("a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 4
    assert tok.tokenize("cat") == ["cat</w>"]
    assert len(tok.tokenize("xylophone")) > 1  # unknown word falls back to pieces
    assert tok.pad_token == "<|endoftext|>"
    padded = tok(["a cat", "xylophone qqq"], padding="max_length", max_length=tok.model_max_length,
                 truncation=True).input_ids
    assert all(len(row) == tok.model_max_length == 16 for row in padded)


def test_tokenizer_custom_words_are_single_tokens():
    # "at" and "cat" compete for merges; the builder must still make each one token.
    tok = build_tiny_tokenizer(["at", "cat", "Caterpillar on grass", "naïve"])
    for word in ("at", "cat", "caterpillar", "on", "grass", "naïve"):
        assert len(tok.tokenize(word)) == 1, word


def test_tokenizer_round_trips_through_save_pretrained(tiny, tmp_path):
    from transformers import CLIPTokenizer

    tiny.tokenizer.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = ["a photo of a horse", "zzz unknown"]
    assert back(text).input_ids == tiny.tokenizer(text).input_ids
    assert back.model_max_length == tiny.tokenizer.model_max_length


def test_save_load_round_trip(tiny, saved_dir):
    for name in ("model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (saved_dir / name).exists(), name
    assert list(saved_dir.glob("unet/*.safetensors"))
    loaded = load_t2i_model(saved_dir)
    assert _same_weights(tiny, loaded)
    assert loaded.scheduler_config == tiny.scheduler_config
    prompts = ["a cat on a blue background", "a dog"]
    assert torch.equal(encode_prompts(tiny, prompts), encode_prompts(loaded, prompts))
    for net in NETS:
        module = getattr(loaded, net)
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters()), net


def test_diffusers_pipeline_loads_saved_dir(tiny, saved_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        saved_dir, safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True)
    for net in NETS:
        a, b = _state(tiny, net), getattr(pipe, net).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), net


def test_load_missing_dir_names_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model") as err:
        load_t2i_model(missing)
    assert "model_index.json" in str(err.value)


def test_load_missing_subfolder_names_it(saved_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match=r"unet/"):
        load_t2i_model(broken)


def test_decode_latents_is_differentiable(tiny):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    images = decode_latents(tiny, latents)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0


def test_encode_prompts_shape_and_rejects_bare_string(tiny):
    emb = encode_prompts(tiny, ["a cat", "a dog", "a horse"])
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32 and not emb.requires_grad
    with pytest.raises(ValueError, match="list"):
        encode_prompts(tiny, "a cat")


def test_ensure_tiny_model_dir_builds_once(tmp_path):
    target = tmp_path / "tiny-sd"
    assert ensure_tiny_model_dir(target) == target
    assert (target / "model_index.json").is_file()
    assert not list(tmp_path.glob("tiny-sd.tmp-*"))
    stamp = (target / "unet").stat().st_mtime_ns
    ensure_tiny_model_dir(target)
    assert (target / "unet").stat().st_mtime_ns == stamp
    assert _same_weights(load_t2i_model(target), build_tiny_model(seed=0))


def test_ensure_tiny_model_dir_accepts_empty_and_refuses_foreign_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_tiny_model_dir(empty) / "model_index.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_tiny_model_dir(foreign)
