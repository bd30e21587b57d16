"""The random SDXL checkpoint has an exact diffusers twin, and a ComfyUI-trained SDXL LoRA works in it.

The harness's random SDXL checkpoint (ComfyUI's own key layout, reduced UNet: three levels of 320
channels, transformer depths 0/2/10 down, 10 in the middle, 1 up) is turned into the EQUIVALENT
diffusers `StableDiffusionXLPipeline`: configs written here (the UNet matching the reduced LDM UNet,
with SDXL's text-time embedding; the SD VAE with SDXL's scaling factor 0.13025; CLIP-L from ComfyUI's
`sd1_clip_config.json`; OpenCLIP bigG from ComfyUI's `clip_config_bigg.json`; ComfyUI's bundled CLIP
tokenizer, padded with "!" for the second encoder as SDXL's tokenizer_2 is), and the weights are
converted with diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).

1. equivalence, on identical inputs (ComfyUI runs in a subprocess):
   - UNet eps with pooled-text and size conditioning: ComfyUI builds `y` with `SDXL.encode_adm`
     (pooled text + 6 size embeddings), diffusers gets ``added_cond_kwargs`` text_embeds / time_ids;
   - the text: ComfyUI's `encode_from_tokens(return_pooled=True)` against diffusers'
     `StableDiffusionXLPipeline.encode_prompt` (both encoders' penultimate states concatenated,
     2048-d, and bigG's projected pooled output);
   - the VAE decode.
2. a LoRA trained by the AlignProp_Trainer node on the SDXL checkpoint loads in diffusers'
   `StableDiffusionXLPipeline.load_lora_weights` with every key consumed and no warning, and changes
   the UNet output (disabling the adapter restores it).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from test_equivalence import PROBE_PREAMBLE, SCHEDULER_CONFIG, VAE_CONFIG, _Records, _rel, run_comfy_probe
from test_trainer_server import trainer_graph

pytestmark = pytest.mark.slow

UNET_CONFIG = {  # diffusers twin of harness.UNET_CONFIGS["sdxl"] (+ ComfyUI's SDXL num_head_channels=64)
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],  # depth 0, 2, 10
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],  # output depths 1, 1, 0
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [320, 320, 320],
    "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],  # the mid block takes the last: 10
    "reverse_transformer_layers_per_block": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
    "cross_attention_dim": 2048, "attention_head_dim": [5, 5, 5],  # heads: 320 channels / 64
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False,
}
SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
SIZE_COND = {"height": 768, "width": 1024, "crop_h": 16, "crop_w": 32, "target_height": 640, "target_width": 896}
PROMPTS = ["cat", "", "a photo of a dog on a beach"]

# After PROBE_PREAMBLE (ComfyUI loads the checkpoint, in a subprocess): write the
# UNet output with SDXL's y, the text conditioning of each prompt and a VAE decode for probe.pt.
_COMFY_PROBE = PROBE_PREAMBLE + r"""
with torch.no_grad():
    dm = model.model.diffusion_model
    y = model.model.encode_adm(pooled_output=probe["pooled"], **probe["size"])
    eps = dm(probe["x"].to(dm.dtype), probe["t"].float(), context=probe["context"].to(dm.dtype),
             y=y.to(dm.dtype), transformer_options={}).float()
    texts = {}
    for p in probe["prompts"]:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        texts[p] = (cond.float(), pooled.float())
    fs = vae.first_stage_model
    image = fs.decode(model.model.process_latent_out(probe["z"]).to(next(fs.parameters()).dtype)).float()
torch.save({"eps": eps, "y": y.float(), "texts": texts, "image": image, "family": type(model.model).__name__,
            "unet_dtype": str(dm.dtype), "clip_dtype": str(next(clip.cond_stage_model.parameters()).dtype)},
           out_path)
"""


# -- the equivalent diffusers pipeline -------------------------------------------------------------
def _write_config_folder(folder: Path, comfy_dir: Path) -> Path:
    """Tokenizers and text-encoder configs for the twin (the weights come from the .ckpt)."""
    comfy = comfy_dir / "comfy"
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            shutil.copyfile(comfy / "sd1_tokenizer" / name, folder / sub / name)
    for sub, config in (("text_encoder", "sd1_clip_config.json"), ("text_encoder_2", "clip_config_bigg.json")):
        (folder / sub).mkdir(exist_ok=True)
        shutil.copyfile(comfy / config, folder / sub / "config.json")
    return folder


def _convert(ckpt_path: Path, text_encoder_2) -> dict[str, dict[str, torch.Tensor]]:
    """SDXL LDM state dict -> diffusers state dicts (fp32) with diffusers' single-file converters."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    ldm = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    ldm = {k: v.float().contiguous() for k, v in ldm.items()}  # the .ckpt holds strided fp16 views
    return {"unet": convert_ldm_unet_checkpoint(ldm, UNET_CONFIG),
            "vae": convert_ldm_vae_checkpoint(ldm, SDXL_VAE_CONFIG),
            "text_encoder": convert_ldm_clip_checkpoint(ldm),
            "text_encoder_2": convert_open_clip_checkpoint(text_encoder_2, ldm,
                                                           prefix="conditioner.embedders.1.model.")}


def _load(net: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load converted weights; every weight of the net must be given and every given key used."""
    own = net.state_dict()
    if not any(k.startswith("text_model.") for k in own) and any(k.startswith("text_model.") for k in state):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}  # transformers 5 layout
    missing, unexpected = net.load_state_dict(state, strict=False)
    # position_ids is a buffer (an arange), not a weight; ComfyUI's SDXL layout saves it for CLIP-L
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    assert not missing and not unexpected, (name, missing[:5], unexpected[:5])
    net.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def twin(comfy_dir, comfy_base_dir, sdxl_checkpoint, tmp_path_factory):
    """(config folder, built parts, ckpt path) of the diffusers twin of the SDXL checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    started = time.monotonic()
    ckpt = comfy_base_dir / "models" / "checkpoints" / sdxl_checkpoint
    folder = _write_config_folder(tmp_path_factory.mktemp("sdxl-diffusers"), comfy_dir)
    parts = {
        "unet": UNet2DConditionModel.from_config(UNET_CONFIG),
        "vae": AutoencoderKL.from_config(SDXL_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
    }
    weights = _convert(ckpt, parts["text_encoder_2"])
    for name, net in parts.items():
        _load(net, weights[name], name)
    del weights
    # ComfyUI's tokenizer file says model_max_length 8192; SDXL's tokenizer_2 pads with "!" (id 0)
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True,
                                                       model_max_length=77)
    parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True,
                                                         model_max_length=77, pad_token="!")
    print(f"\n[equivalence-sdxl] converted and built {sdxl_checkpoint} in {time.monotonic() - started:.1f} s")
    return folder, parts, ckpt


def _pipeline(parts: dict):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                     tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
                                     scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG))


def _time_ids(size: dict) -> torch.Tensor:
    return torch.tensor([[size["height"], size["width"], size["crop_h"], size["crop_w"], size["target_height"],
                          size["target_width"]]], dtype=torch.float32)


# -- 1. equivalence ----------------------------------------------------------------------------------
def test_diffusers_sdxl_twin_matches_comfyui_outputs(twin, comfy_dir, tmp_path):
    """UNet eps (with pooled + size conditioning), both text encoders' context and pooled output, and
    the VAE decode of the diffusers twin equal ComfyUI's for the same inputs."""
    _, parts, ckpt = twin
    gen = torch.Generator().manual_seed(0)
    probe = {"x": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor([981, 321]),
             "context": torch.randn(2, 77, 2048, generator=gen) * 0.5,
             "pooled": torch.randn(2, 1280, generator=gen), "size": SIZE_COND, "prompts": PROMPTS,
             "z": torch.randn(1, 4, 8, 8, generator=gen)}
    started = time.monotonic()
    comfy = run_comfy_probe(_COMFY_PROBE, probe, comfy_dir, ckpt, tmp_path, timeout=1200)
    assert comfy["family"] == "SDXL", comfy["family"]
    print(f"\n[equivalence-sdxl] ComfyUI probe {time.monotonic() - started:.1f} s")

    pipe = _pipeline(parts)
    with torch.no_grad():
        time_ids = _time_ids(SIZE_COND).repeat(2, 1)
        eps = parts["unet"](probe["x"], probe["t"], encoder_hidden_states=probe["context"],
                            added_cond_kwargs={"text_embeds": probe["pooled"], "time_ids": time_ids}).sample
        texts = {}
        for p in PROMPTS:
            context, _, pooled, _ = pipe.encode_prompt(prompt=p, device=torch.device("cpu"), num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
            texts[p] = (context, pooled)
        image = parts["vae"].decode(probe["z"] / SDXL_VAE_CONFIG["scaling_factor"]).sample

    unet_rel = _rel(eps, comfy["eps"])
    context_rel = max(_rel(texts[p][0], comfy["texts"][p][0]) for p in PROMPTS)
    pooled_rel = max(_rel(texts[p][1], comfy["texts"][p][1]) for p in PROMPTS)
    vae_rel = _rel(image, comfy["image"])
    print(f"[equivalence-sdxl] ComfyUI unet {comfy['unet_dtype']}, clip {comfy['clip_dtype']}; rel. errors: "
          f"unet eps {unet_rel:.2e}, text context (77x2048) {context_rel:.2e}, pooled (1280) {pooled_rel:.2e}, "
          f"vae decode {vae_rel:.2e}")
    assert all(texts[p][0].shape == comfy["texts"][p][0].shape == (1, 77, 2048) for p in PROMPTS)
    assert all(texts[p][1].shape == comfy["texts"][p][1].shape == (1, 1280) for p in PROMPTS)
    assert unet_rel < 1e-4
    assert context_rel < 1e-4
    assert pooled_rel < 1e-4
    assert vae_rel < 1e-4
    # the size conditioning matters: other sizes give another eps
    with torch.no_grad():
        other = parts["unet"](probe["x"], probe["t"], encoder_hidden_states=probe["context"],
                              added_cond_kwargs={"text_embeds": probe["pooled"],
                                                 "time_ids": _time_ids({**SIZE_COND, "width": 512}).repeat(2, 1)}
                              ).sample
    assert _rel(other, eps) > 100 * unet_rel


# -- 2. a ComfyUI-trained SDXL LoRA in diffusers ----------------------------------------------------
@pytest.fixture(scope="module")
def node_lora_sdxl(server, sdxl_checkpoint) -> Path:
    """The LoRA the AlignProp_Trainer node trains on the SDXL checkpoint (64 px, 3 DDIM steps, 2 steps)."""
    started = time.monotonic()
    server.run(trainer_graph(sdxl_checkpoint, "alignprop_equiv/sdxl_node"), timeout=1500)
    print(f"\n[equivalence-sdxl] node training run: {time.monotonic() - started:.1f} s")
    return server.models_dir / "loras" / "alignprop_equiv" / "sdxl_node.safetensors"


def _eps(unet, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 2048, generator=gen) * 0.5
    cond = {"text_embeds": torch.randn(1, 1280, generator=gen), "time_ids": _time_ids(SIZE_COND)}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=cond).sample


def test_node_sdxl_lora_loads_in_diffusers_with_every_key(twin, node_lora_sdxl):
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    _, parts, _ = twin
    pipe = _pipeline(parts)
    before = _eps(pipe.unet)
    with safe_open(str(node_lora_sdxl), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys), [k for k in keys if not k.startswith("lora_unet_")][:5]
    assert metadata.get("modelspec.architecture", "").startswith("stable-diffusion-xl"), metadata
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(node_lora_sdxl), adapter_name="alignprop")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    # a UNet-only LoRA: nothing in the file is meant for either text encoder
    benign = ("No LoRA keys associated to CLIPTextModel", "No LoRA keys associated to CLIPTextModelWithProjection")
    problems = [line for line in records.lines if not any(b in line for b in benign)]
    problems += [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not problems, "\n".join(problems)
    layers = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    text_layers = [n for enc in (pipe.text_encoder, pipe.text_encoder_2) for n, m in enc.named_modules()
                   if isinstance(m, LoraLayer)]
    assert not text_layers, text_layers[:5]
    assert len(layers) * 3 == len(keys), (len(layers), len(keys))  # lora_down, lora_up, alpha per module
    after = _eps(pipe.unet)
    pipe.unet.disable_adapters()
    disabled = _eps(pipe.unet)
    change = _rel(after, before)
    print(f"\n[equivalence-sdxl] diffusers loaded {len(layers)} LoRA modules ({len(keys)} keys), no warnings; "
          f"UNet eps change with the LoRA: rel {change:.2e}")
    assert change > 1e-6
    torch.testing.assert_close(disabled, before)
    json.dumps(metadata)  # the metadata is plain strings
