"""The SD3/SD3.5 and FLUX.1 backends against diffusers' own pipelines, on tiny random folders.

The folders are written once per module by `tiny_flow_models` (real classes, tiny widths) and opened
both by `load_backend` and by `StableDiffusion3Pipeline` / `FluxPipeline`. Prompt embeddings, whole
sampling runs (SD3 with classifier-free guidance, FLUX.1-dev with distilled guidance and its
image-size shift) and decoded images are compared with the pipelines'; gradients through the flow
chain are checked with and without checkpointing and against central finite differences in float64;
bad folders and image sizes fail early with a sentence.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from alignprop_core.cli import main
from alignprop_core.config import LoraConfig, SamplerConfig
from alignprop_core.lora import add_lora, lora_parameters
from alignprop_core.models.flux_model import pack_latents, unpack_latents
from alignprop_core.models.loading import load_backend, model_folder_info
from alignprop_core.models.prompt_cache import cached_encoder
from alignprop_core.models.sd3_model import load_sd3_model, sd3_backend
from alignprop_core.models.tiny_flow_models import (build_tiny_flux_pipeline, build_tiny_sd3_pipeline,
                                                    ensure_tiny_flux_dir, ensure_tiny_sd3_dir)
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.chain import make_chain
from alignprop_core.sampling.sampler import sample_images, sample_latents, with_guidance

PROMPTS = ["a cat", "a photo of a red dog"]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "sd3_no_t5": StableDiffusion3Pipeline,
             "flux": FluxPipeline, "flux_schnell": FluxPipeline}
# 32 x 48 pixels: 16 x 24 latents, 96 tokens, so FLUX's mu (0.473) is not that of the square size
HEIGHT, WIDTH = 32, 48
# the cache encodes each distinct prompt once, so ["", ""] runs as a batch of one: the projection's
# matmul may then round differently in the last bit than the pipeline's batch of two
TEXT_TOL = dict(rtol=0, atol=1e-6)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_models")
    return {"sd3": ensure_tiny_sd3_dir(root / "sd3"),
            "sd3_no_t5": ensure_tiny_sd3_dir(root / "sd3_no_t5", with_t5=False),
            "flux": ensure_tiny_flux_dir(root / "flux"),
            "flux_schnell": ensure_tiny_flux_dir(root / "flux_schnell", guidance_embeds=False)}


@pytest.fixture(scope="module")
def backends(folders):
    return {kind: load_backend(path) for kind, path in folders.items()}


def _pipeline(folders, kind):
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3_no_t5" else {}
    return PIPELINES[kind].from_pretrained(folders[kind], local_files_only=True, **extra)


def _x_T(backend, batch=2, height=HEIGHT, width=WIDTH, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(backend.latent_shape(batch, height, width), generator=g, dtype=dtype)


# ---- folders and prompts ----

@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipeline_opens_our_folder_and_prompts_encode_alike(folders, backends, kind):
    backend, pipe = backends[kind], _pipeline(folders, kind)
    ours = backend.encode_prompts(PROMPTS)
    with torch.no_grad():  # the pipeline encodes without grad too; kernels differ with grad on
        if kind.startswith("sd3"):
            context, negative, pooled, negative_pooled = pipe.encode_prompt(
                PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt="")
            empty = backend.encode_prompts(["", ""])
            torch.testing.assert_close(empty["context"], negative, **TEXT_TOL)
            torch.testing.assert_close(empty["pooled"], negative_pooled, **TEXT_TOL)
        else:
            context, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None)
    torch.testing.assert_close(ours["context"], context, **TEXT_TOL)
    torch.testing.assert_close(ours["pooled"], pooled, **TEXT_TOL)
    if kind == "sd3_no_t5":
        assert (ours["context"][:, 16:] == 0).all()  # zeros after the 16 CLIP tokens, as diffusers


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_loaded_networks_are_frozen_and_described(backends, kind):
    backend = backends[kind]
    assert backend.arch == kind and backend.patch_size == 2 and backend.vae_scale_factor == 2
    assert backend.latent_channels == 16 and backend.latent_shape(1, 32, 32) == (1, 16, 16, 16)
    assert not any(p.requires_grad for p in backend.lora_target.parameters())
    assert not backend.lora_target.training
    assert backend.guidance_input == (kind == "flux")
    assert backend.default_guidance == (3.5 if kind == "flux" else None)
    assert backend.schedule.sigma_grid == ("flux" if kind == "flux" else "default")
    with torch.no_grad():
        assert backend.decode(torch.zeros(1, 16, 16, 16)).shape == (1, 3, 32, 32)


def test_tiny_weights_are_a_pure_function_of_the_seed():
    state = torch.get_rng_state()
    a, b = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    other = build_tiny_sd3_pipeline(seed=1), build_tiny_sd3_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    for net in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), net
    s1, s0 = other[0].transformer.state_dict(), other[1].transformer.state_dict()
    assert not torch.equal(s1["pos_embed.proj.weight"], s0["pos_embed.proj.weight"])


def test_prompt_cache_runs_each_text_encoder_once_per_prompt(folders):
    model = load_sd3_model(folders["sd3"])
    backend = sd3_backend(model)
    calls = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: calls.append((name, args[0].shape[0])))
    first = backend.encode_prompts(["a cat", "a dog", "a cat"])
    assert sorted(calls) == [("text_encoder", 2), ("text_encoder_2", 2), ("text_encoder_3", 2)]
    calls.clear()
    again = backend.encode_prompts(["a dog", "a cat"])
    assert calls == []
    torch.testing.assert_close(again["context"], first["context"][[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(first["context"][0], first["context"][2], rtol=0, atol=0)


def test_prompt_cache_drops_the_least_recently_used_prompt():
    seen = []

    def encode_batch(prompts):
        seen.append(list(prompts))
        return {"context": torch.tensor([[float(len(p))] for p in prompts])}
    encode = cached_encoder(encode_batch, capacity=2)
    assert encode(["a", "bb"])["context"].tolist() == [[1.0], [2.0]]
    encode(["a"])  # "a" is now the most recent, "bb" the least
    encode(["ccc"])  # evicts "bb"
    encode(["a", "bb"])
    assert seen == [["a", "bb"], ["ccc"], ["bb"]]
    with pytest.raises(ValueError, match="wrap a single prompt"):
        encode("a cat")


# ---- sampling and decoding against the pipelines ----

def _pipeline_latents(pipe, kind, x_T, cfg, output_type="latent"):
    common = dict(prompt=PROMPTS, num_inference_steps=cfg.steps, height=HEIGHT, width=WIDTH,
                  output_type=output_type)
    if kind == "sd3":
        return pipe(latents=x_T, negative_prompt="", guidance_scale=cfg.guidance_scale, **common).images
    out = pipe(latents=pack_latents(x_T), guidance_scale=cfg.distilled_guidance or 3.5, **common).images
    return unpack_latents(out, *x_T.shape[-2:]) if output_type == "latent" else out


def _our_latents(backend, x_T, cfg):
    cond = with_guidance(backend, cfg, backend.encode_prompts(PROMPTS))
    uncond = with_guidance(backend, cfg, backend.encode_prompts([""] * 2)) if cfg.use_cfg else None
    return sample_latents(backend.denoiser, backend.schedule, x_T, cond, uncond, cfg, grad_steps=0)


CONFIGS = {"sd3": SamplerConfig(steps=4, guidance_scale=4.0),
           "flux": SamplerConfig(steps=4, use_cfg=False, distilled_guidance=5.0),
           "flux_schnell": SamplerConfig(steps=4, use_cfg=False)}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_sampling_equals_the_pipeline(folders, backends, kind):
    backend, cfg = backends[kind], CONFIGS[kind]
    x_T = _x_T(backend)
    ours = _our_latents(backend, x_T, cfg)
    with torch.no_grad():
        ref = _pipeline_latents(_pipeline(folders, kind), "sd3" if kind == "sd3" else "flux", x_T, cfg)
    assert ours.shape == x_T.shape and ours.abs().max() > 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_flux_noise_levels_follow_the_image_size(backends):
    """The run above is not at FLUX's base shift: a square image of fewer tokens gets other sigmas."""
    schedule = backends["flux"].schedule
    wide = make_chain(schedule, 4, 0.0, (1, 16, HEIGHT // 2, WIDTH // 2))
    square = make_chain(schedule, 4, 0.0, (1, 16, HEIGHT // 2, HEIGHT // 2))
    assert wide[1].sigma - square[1].sigma > 1e-4


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_decode_equals_the_pipeline(folders, backends, kind):
    backend, cfg = backends[kind], CONFIGS[kind]
    x_T = _x_T(backend)
    with torch.no_grad():
        ours = backend.decode(_our_latents(backend, x_T, cfg))
        ref = _pipeline_latents(_pipeline(folders, kind), kind, x_T, cfg, output_type="pt")
    assert ours.shape == ref.shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# ---- gradients through the flow chain ----

@pytest.fixture(scope="module")
def lora_backends(folders):
    """float64 backends with a small random LoRA on the transformer's attention projections."""
    out = {}
    for kind in ("sd3", "flux"):
        backend = load_backend(folders[kind], dtype=torch.float64)
        add_lora(backend.lora_target, LoraConfig(rank=2, alpha=2.0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in lora_parameters(backend.lora_target):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        out[kind] = backend
    return out


GRAD_CONFIGS = {"sd3": dict(steps=2, guidance_scale=3.0), "flux": dict(steps=2, use_cfg=False)}


def _loss(backend, cfg, k):
    x_T = _x_T(backend, height=16, width=16, dtype=torch.float64)
    images = sample_images(backend, PROMPTS, cfg, x_T, grad_steps=k)
    return -make_reward("color_target")(images, PROMPTS).mean()


def _grads(backend, cfg, k):
    params = [p for _, p in lora_parameters(backend.lora_target)]
    for p in params:
        p.grad = None
    _loss(backend, cfg, k).backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_checkpointing_leaves_flow_gradients_unchanged(lora_backends, kind):
    backend = lora_backends[kind]
    base = GRAD_CONFIGS[kind]
    ckpt = _grads(backend, SamplerConfig(**base, k=2), 2)
    plain = _grads(backend, SamplerConfig(**base, k=2, checkpoint_unet=False, checkpoint_vae=False), 2)
    assert any(g.abs().max() > 0 for g in ckpt)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_full_backprop_matches_finite_differences(lora_backends, kind):
    backend = lora_backends[kind]
    cfg = SamplerConfig(**GRAD_CONFIGS[kind], k=2)
    grads = _grads(backend, cfg, 2)
    g = torch.Generator().manual_seed(11)
    direction = [torch.randn(gr.shape, generator=g, dtype=gr.dtype) for gr in grads]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    params = [p for _, p in lora_parameters(backend.lora_target)]
    original = [p.detach().clone() for p in params]
    # diffusers' RMSNorm (the attention's query/key norm) takes its variance in float32 even for
    # float64 inputs, which adds ~1e-8 relative noise to the loss: a step of 1e-3 keeps the
    # quotient's noise near 1e-5 while its truncation error stays smaller still
    h, values = 1e-3, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, p0, d in zip(params, original, direction):
                p.copy_(p0 + sign * h * d)
            values.append(float(_loss(backend, cfg, 0)))
        for p, p0 in zip(params, original):
            p.copy_(p0)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-4, abs=1e-10)


# ---- bad folders and sizes ----

def _unsupported_folder(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    return folder


def test_an_unsupported_pipeline_class_is_named_before_loading(tmp_path):
    folder = _unsupported_folder(tmp_path)
    expected = ("is a KandinskyPipeline folder; AlignProp's core trains StableDiffusionPipeline (SD1.x), "
                "StableDiffusion3Pipeline (SD3/SD3.5) and FluxPipeline (FLUX.1) folders")
    for read in (load_backend, model_folder_info):
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            read(folder)


def test_missing_parts_are_named(folders, tmp_path):
    broken = tmp_path / "sd3"
    shutil.copytree(folders["sd3"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match=r"lacks subfolder\(s\) transformer/"):
        load_backend(broken)
    with pytest.raises(FileNotFoundError, match="without transformer/config.json"):
        model_folder_info(broken)
    # model_index.json names a T5 whose folder is gone: an incomplete download, not a T5-less model
    no_t5 = tmp_path / "sd3_t5_gone"
    shutil.copytree(folders["sd3"], no_t5)
    shutil.rmtree(no_t5 / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_3/.*\[null, null\]"):
        load_backend(no_t5)
    flux = tmp_path / "flux"
    shutil.copytree(folders["flux"], flux)
    (flux / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: missing tokenizer_2/tokenizer.json"):
        load_backend(flux)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_image_sizes_must_be_multiples_of_vae_factor_times_patch(folders, backends, kind):
    info = model_folder_info(folders[kind])
    assert (info.vae_scale_factor, info.patch_size, info.size_multiple) == (2, 2, 4)
    info.check_image_size(32, 48)
    message = r"width=30 and height=32 must be multiples of 4 \(the VAE factor 2 times the patch size 2\)"
    with pytest.raises(ValueError, match=message):
        info.check_image_size(30, 32)
    with pytest.raises(ValueError, match=message):
        backends[kind].latent_shape(1, 32, 30)


def _cli(capsys, tmp_path, model, *flags):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["train", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--reward", "color_target", "--device", "cpu", *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_cli_refuses_an_unsupported_folder_and_a_bad_size(folders, tmp_path, capsys, monkeypatch):
    from alignprop_core import reporting

    monkeypatch.setattr(reporting, "run_and_report", lambda *a, **k: pytest.fail("reached loading"))
    code, err = _cli(capsys, tmp_path, _unsupported_folder(tmp_path))
    assert code == 2 and err.startswith("alignprop: error: --model ") and len(err.strip().splitlines()) == 1
    assert "is a KandinskyPipeline folder" in err and "FluxPipeline (FLUX.1)" in err
    code, err = _cli(capsys, tmp_path, folders["flux"], "--width", "30", "--height", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--width 30 and --height 32 must be multiples of 4 (the VAE factor 2 times the patch size 2)" in err
    assert not (tmp_path / "out").exists()
