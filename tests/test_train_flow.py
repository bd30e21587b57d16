"""Training SD3/SD3.5 and FLUX.1 models end to end, from the command line and from Python, on the
tiny random folders: the LoRA written loads into diffusers' own pipeline and changes its output, the
new sampler flags reach the run, and settings or files of the wrong kind are refused before work."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from alignprop_core.cli import main
from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import add_lora, load_lora, save_lora
from alignprop_core.models.loading import load_backend
from alignprop_core.models.tiny_flow_models import ensure_tiny_flux_dir, ensure_tiny_sd3_dir
from alignprop_core.models.tiny_model import build_tiny_model
from alignprop_core.rewards import make_reward
from alignprop_core.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
# FLUX trains with DRaFT-LV and its distilled-guidance input, SD3 with truncation and real CFG
FLAGS = {"sd3": ["--sampler-k", "2", "--sampler-guidance-scale", "3"],
         "flux": ["--sampler-k", "1", "--sampler-estimator", "draft_lv", "--sampler-lv-samples", "1",
                  "--sampler-distilled-guidance", "2.5", "--no-sampler-use-cfg"]}
ARCHITECTURE = {"sd3": "stable-diffusion-3", "flux": "flux-1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_flow")
    return {"sd3": ensure_tiny_sd3_dir(root / "sd3"), "flux": ensure_tiny_flux_dir(root / "flux")}


def _cli(tmp_path, model, *flags):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return main(["train", "--model", str(model), "--prompts", str(prompts), "--eval-prompts", str(prompts),
                 "--out", str(tmp_path / "out"), "--reward", "color_target", "--device", "cpu",
                 "--steps", "2", "--batch-size", "1", "--lr", "5e-2", "--sampler-steps", "3",
                 "--width", "32", "--height", "32", "--eval-latents", "1", "--eval-every", "0", *flags])


def _pipeline_latents(pipe, kind):
    kwargs = dict(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    kwargs |= {"guidance_scale": 2.5} if kind == "flux" else {"guidance_scale": 3.0}
    return pipe(**kwargs).images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_trains_a_lora_that_diffusers_loads_and_that_changes_its_output(folders, tmp_path, capsys, kind):
    code = _cli(tmp_path, folders[kind], *FLAGS[kind])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    sampler = json.loads((out / "metrics.json").read_text())["config"]["sampler"]
    assert sampler["estimator"] == ("draft_lv" if kind == "flux" else "truncated")
    lora = load_lora(out / "alignprop_lora.safetensors")
    assert ARCHITECTURE[kind] in lora.metadata["modelspec.architecture"]
    assert lora.metadata["alignprop.base_model"] == folders[kind].name

    pipe = PIPELINES[kind].from_pretrained(folders[kind], local_files_only=True)
    before = _pipeline_latents(pipe, kind)
    pipe.load_lora_weights(str(out / "alignprop_lora.safetensors"))
    after = _pipeline_latents(pipe, kind)
    assert (after - before).abs().max() > 1e-4  # the trained LoRA reached diffusers' transformer


def test_sampler_settings_the_model_cannot_take_are_refused_before_loading(folders, tmp_path, capsys,
                                                                           monkeypatch):
    from alignprop_core import reporting

    monkeypatch.setattr(reporting, "run_and_report", lambda *a, **k: pytest.fail("reached loading"))
    for model, flags, expect in ((folders["sd3"], ("--sampler-distilled-guidance", "3.5"), "has no guidance input"),
                                 (folders["flux"], ("--sampler-eta", "0.3"), "rectified-flow model")):
        code = _cli(tmp_path, model, *flags)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()
    # FLUX.1-dev has the input: the same setting passes the checks and reaches loading
    with pytest.raises(pytest.fail.Exception, match="reached loading"):
        _cli(tmp_path, folders["flux"], "--sampler-distilled-guidance", "3.5")


def test_an_init_lora_of_another_family_is_refused_and_nothing_is_written(folders, tmp_path):
    sd15 = build_tiny_model(0)
    add_lora(sd15.unet, LoraConfig(rank=2, alpha=2.0))
    init = save_lora(tmp_path / "sd15.safetensors", sd15.unet, LoraConfig(rank=2, alpha=2.0), arch="sd15")
    backend = load_backend(folders["flux"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"sd15.*flux|flux.*sd15"):
        train(backend, make_reward("color_target"), ["a cat"], ["a dog"], SamplerConfig(steps=2),
              LoraConfig(rank=2, alpha=2.0), TrainConfig(steps=1, width=32, height=32, batch_size=1),
              out_dir=out, init_lora=load_lora(init))
    assert not out.exists() or not any(out.iterdir())
