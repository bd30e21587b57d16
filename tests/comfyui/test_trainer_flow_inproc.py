"""The AlignProp Trainer node on real ComfyUI SD3 and FLUX.1 MODELs, run as ComfyUI's executor runs it.

In a ComfyUI process (inproc.py), per family: the MODEL is ComfyUI's own diffusion model built by its
detection from the tiny weights of ``flow_twins``, the VAE ComfyUI's own 16-channel VAE (random
weights), and for SD3/FLUX the CLIP a stand-in with the text widths the MODEL takes (ComfyUI's
T5-XXL is 4.7 B parameters; the real CLIP-L/G and T5-XXL paths run on the server). The trainer trains 2 steps toward the
smoothness reward with CFG (and FLUX.1-dev's distilled guidance); the FLUX model once more with its
weights in float8 (Load Diffusion Model's weight_dtype fp8_e4m3fn), and FLUX.1-schnell (no guidance
input), and a Z-Image NextDiT (ComfyUI's ZImage model, random weights) with ComfyUI's own Z-Image
text encoder at a small Qwen3 size (flow_twins.comfy_zimage_clip: its prompts have different token
counts). Then:

- the LoRA trained (float32 factors, non-zero lora_up) while fp8 base weights stayed fp8;
- the LoRA file holds kohya keys of ComfyUI's fused layers and names the family and the reward;
- ComfyUI's LoraLoaderModelOnly loads it with no "lora key not loaded" line and KSampler's output
  changes; the trainer's own MODEL output samples what the loader's does;
- Save LoRA with key_format diffusers writes it in diffusers' keys, which ComfyUI's loader reads to
  the same output (diffusers itself reads them: test_native_lora_comfy.py);
- the MODEL the trainer was given is left as it was (no LoRA layers, every weight bit-identical);
- a CLIP of other widths, eta > 0, distilled guidance on SD3 or schnell, DRaFT-LV with n < 1 and an init LoRA
  of the other family are each refused with a message naming what to change, and nothing is written.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import inproc
from flow_twins import FAMILIES
from test_trainer_server import inproc_settings

pytestmark = pytest.mark.slow

# argv after comfy_dir, base_dir: results path, JSON settings, then per case: name, arch, weights, JSON config,
# weight dtype ("none" or Load Diffusion Model's "fp8_e4m3fn")
_SCRIPT = r"""
import json, os, sys
import torch
import inproc
pack = inproc.setup(sys.argv[1], sys.argv[2])
import folder_paths
import nodes as comfy_nodes
from flow_twins import StandInClip, comfy_flow_model, comfy_flow_vae, comfy_zimage_clip, comfy_zimage_model
from alignprop_core.lora import has_lora
from ComfyUI_AlignProp.nodes.comfy_families import model_family, text_widths
from ComfyUI_AlignProp.nodes.comfy_flow import takes_guidance


classes = {c.define_schema().node_id: c for c in pack.NODE_CLASSES}


def node(node_id, **inputs):
    return inproc.execute(classes[node_id], **inputs).result


settings = json.loads(sys.argv[4])
reward = node("AlignProp_SimpleReward", kind="smoothness", red=1.0, green=0.5, blue=0.1)[0]
sampler_inputs = dict(settings["sampler"], estimator="truncated", lv_samples=2, distilled_guidance=0.0)


def sampler(**over):
    return node("AlignProp_SamplerSettings", **{**sampler_inputs, **over})[0]


train_inputs = dict(settings["train"], **{socket: node(kind, **inputs)[0]
                                          for socket, (kind, inputs) in settings["settings"].items()})
vae = comfy_flow_vae()
loras_dir = folder_paths.get_folder_paths("loras")[0]


def listing():
    return sorted(os.path.relpath(os.path.join(root, f), loras_dir) for root, _, files in os.walk(loras_dir)
                  for f in files)


def ksample(model, clip, guided):
    context, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    extra = {} if pooled is None else {"pooled_output": pooled}
    positive = [[context, {**extra, **({"guidance": 3.5} if guided else {})}]]
    negative = [[torch.zeros_like(context), {k: torch.zeros_like(v) for k, v in extra.items()}]]
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    (out,) = comfy_nodes.common_ksampler(model, 0, 3, 1.0 if guided else 4.0, "euler", "simple", positive, negative,
                                         latent)
    return out["samples"]


def refused(fn):
    try:
        fn()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


results, trained = {}, {}
args = sys.argv[5:]
for case, arch, weights, extra, weight_dtype in zip(*[args[i::5] for i in range(5)]):
    if arch == "zimage":
        model = comfy_zimage_model()
    else:
        model = comfy_flow_model(weights, extra, None if weight_dtype == "none" else weight_dtype)
    width, pooled_width = text_widths(model)
    clip = comfy_zimage_clip() if arch == "zimage" else StandInClip(width, pooled_width)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    inputs = dict(model=model, clip=clip, vae=vae, reward=reward, prompts="cat\ndog", sampler=sampler(),
                  **train_inputs)
    out_model, lora, curve, path, lora_model, *_ = node("AlignProp_Trainer", lora_name=f"alignprop/{case}", **inputs)
    if case == arch and arch != "zimage":
        trained[arch] = (model, clip, inputs, lora)
    unchanged = (not has_lora(model.model.diffusion_model)
                 and before.keys() == model.model.diffusion_model.state_dict().keys()
                 and all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items()))
    with inproc.warnings_logged() as warnings:
        loaded = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, os.path.relpath(path, loras_dir),
                                                                        1.0)[0]
    guided = takes_guidance(model)
    results[case] = {"family": model_family(model), "guided": guided, "path": path, "unchanged": unchanged,
                     "messages": warnings, "lora_model_is_the_file": sorted(lora_model) == sorted(lora.state)
                     and all(torch.equal(lora_model[k], lora.state[k]) for k in lora.state),
                     "weight_dtypes": sorted({str(p.dtype) for p in model.model.diffusion_model.parameters()}),
                     "patched_modules": len(loaded.patches), "curve_shape": list(curve.shape),
                     "base": ksample(model, clip, guided), "loader": ksample(loaded, clip, guided),
                     "node_model": ksample(out_model, clip, guided)}
    # Save LoRA in diffusers keys: ComfyUI's loader reads that form too, to the same output
    if case == arch and arch != "zimage":
        (saved,) = node("AlignProp_SaveLora", lora=lora, lora_name=f"alignprop/{case}_diffusers", dtype="fp32",
                        key_format="diffusers")
        with inproc.warnings_logged() as diffusers_warnings:
            loaded = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, os.path.relpath(saved, loras_dir),
                                                                            1.0)[0]
        results[case].update(diffusers_path=saved, diffusers_messages=diffusers_warnings,
                             diffusers_loader=ksample(loaded, clip, guided))
    if arch == "zimage":  # prompts of different token counts in one batch = each prompt on its own
        from ComfyUI_AlignProp.nodes.comfy_flow import flow_denoiser
        den, g = flow_denoiser(model), torch.Generator().manual_seed(3)
        x, ctx = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 7, width, generator=g)
        t = torch.tensor([800.0, 300.0])
        with torch.no_grad():
            both = den(x, t, {"context": ctx, "tokens": torch.tensor([5.0, 7.0])})
            alone = torch.cat([den(x[:1], t[:1], {"context": ctx[:1, :5]}), den(x[1:], t[1:], {"context": ctx[1:]})])
        results[case]["grouped_error"] = float((both - alone).abs().max())
    if case == "flux_schnell":  # no guidance input: a distilled guidance is refused
        results[case]["guidance_refused"] = refused(lambda: node(
            "AlignProp_Trainer", lora_name="alignprop/bad_schnell",
            **{**inputs, "sampler": sampler(distilled_guidance=3.5)}))

for arch, (model, clip, inputs, _) in trained.items():
    other = trained["flux" if arch == "sd3" else "sd3"][3]
    files = listing()
    name = f"alignprop/bad_{arch}"
    cases = {
        "clip": lambda: node("AlignProp_Trainer", lora_name=name,
                             **{**inputs, "clip": StandInClip(clip.dim + 8, clip.pooled_dim)}),
        "eta": lambda: node("AlignProp_Trainer", lora_name=name, **{**inputs, "sampler": sampler(eta=0.5)}),
        "init_lora": lambda: node("AlignProp_Trainer", lora_name=name, init_lora=other,
                                  **{k: v for k, v in inputs.items() if k != "lora_settings"}),
        "lv_samples": lambda: sampler(estimator="draft_lv", lv_samples=0),
    }
    if arch == "sd3":
        cases["guidance"] = lambda: node("AlignProp_Trainer", lora_name=name,
                                         **{**inputs, "sampler": sampler(distilled_guidance=3.5)})
    results[arch]["refusals"] = {case: refused(fn) for case, fn in cases.items()}
    results[arch]["written"] = sorted(set(listing()) - set(files))
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def flow_runs(comfy_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer-flow")
    args = []
    for arch in ("sd3", "flux"):
        spec = FAMILIES[arch]
        weights = tmp / f"{arch}_transformer.safetensors"
        base = spec["make"](**spec["sizes"])
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
        args += [arch, arch, str(weights), json.dumps(spec["comfy_config"]), "none"]
    args += ["flux_fp8", "flux", str(tmp / "flux_transformer.safetensors"),
             json.dumps(FAMILIES["flux"]["comfy_config"]), "fp8_e4m3fn"]
    schnell = FAMILIES["flux"]["make"](**FAMILIES["flux"]["sizes"], guidance_embeds=False)  # FLUX.1-schnell
    save_file({k: v.contiguous() for k, v in schnell.state_dict().items()}, str(tmp / "schnell.safetensors"))
    args += ["flux_schnell", "flux", str(tmp / "schnell.safetensors"), json.dumps(FAMILIES["flux"]["comfy_config"]),
             "none"]
    args += ["zimage", "zimage", "none", "{}", "none"]  # flow_twins.ZIMAGE_CONFIG, random weights
    settings = inproc_settings(width=32, height=32)
    out = tmp / "results.pt"
    inproc.run_script(_SCRIPT, comfy_dir, tmp / "base", str(out), json.dumps(settings), *args, timeout=900)
    return torch.load(out, weights_only=True)


# a layer of each family's default targets in ComfyUI's naming (families.NATIVE_TWINS)
FUSED_KEYS = {"sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn_proj"),
              "flux": ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"),
              "zimage": ("lora_unet_layers_0_attention_qkv", "lora_unet_layers_1_attention_out",
                         "lora_unet_context_refiner_0_attention_qkv")}
ARCHITECTURES = {"sd3": "stable-diffusion-3", "flux": "flux-1", "zimage": "z-image"}
CASES = {"sd3": "sd3", "flux": "flux", "flux_fp8": "flux", "flux_schnell": "flux", "zimage": "zimage"}  # -> family


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_writes_a_kohya_lora_of_comfyuis_layers(case, flow_runs):
    got, arch = flow_runs[case], CASES[case]
    assert got["lora_model_is_the_file"]  # the LORA_MODEL output holds exactly the written file's tensors
    with safe_open(got["path"], "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert all(t.dtype == torch.float32 for t in ups)
    assert max(float(t.abs().max()) for t in ups) > 0  # it trained: lora_up starts at zero
    assert all(k.startswith("lora_unet_") for k in keys)
    for module in FUSED_KEYS[arch]:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= keys
    assert meta["modelspec.architecture"].startswith(ARCHITECTURES[arch])
    assert "smoothness" in meta["alignprop.reward"]
    assert got["curve_shape"][0] == 1 and got["curve_shape"][-1] == 3


@pytest.mark.parametrize("case", list(CASES))
def test_comfyuis_lora_loader_takes_every_key_and_ksampler_output_changes(case, flow_runs):
    got = flow_runs[case]
    skipped = [m for m in got["messages"] if "lora key not loaded" in m or "NOT LOADED" in m]
    assert not skipped, skipped
    assert got["patched_modules"] > 0
    assert (got["loader"] - got["base"]).abs().max() > 1e-5
    torch.testing.assert_close(got["node_model"], got["loader"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_the_shared_model_is_left_as_it_was(case, flow_runs):
    assert flow_runs[case]["unchanged"]


def test_fp8_weights_stay_fp8_while_the_lora_trains_in_float32(flow_runs):
    """Load Diffusion Model with weight_dtype fp8_e4m3fn: the base weights ComfyUI holds stay float8
    (norms and embeddings ComfyUI keeps in float32 aside), the LoRA factors are float32."""
    assert "torch.float8_e4m3fn" in flow_runs["flux_fp8"]["weight_dtypes"]
    assert flow_runs["flux"]["weight_dtypes"] == ["torch.float32"]


REFUSALS = {
    "clip": ("does not belong", "Connect the model's own text encoders"),
    "eta": ("eta=0.5", "set eta to 0"),
    "init_lora": ("This LoRA was trained for", "give a LoRA trained on"),
    "lv_samples": ("lv_samples",),
    "guidance": ("distilled_guidance", "no guidance input"),
}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_bad_input_is_refused_by_name_and_nothing_is_written(arch, flow_runs):
    got = flow_runs[arch]
    for case, message in got["refusals"].items():
        assert message is not None, case
        assert message.startswith("ValueError"), (case, message)
        for words in REFUSALS[case]:
            assert words in message, (case, message)
    assert got["written"] == []


def test_schnell_is_its_own_family_without_a_guidance_input(flow_runs):
    got = flow_runs["flux_schnell"]
    assert (got["family"], got["guided"]) == ("FluxSchnell", False)
    assert (flow_runs["flux"]["family"], flow_runs["flux"]["guided"]) == ("Flux", True)
    message = got["guidance_refused"]
    assert message and "distilled_guidance=3.5" in message and "no guidance input" in message, message


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_save_lora_in_diffusers_keys_gives_comfyui_the_same_lora(arch, flow_runs):
    """The trained LoRA saved by Save LoRA with key_format diffusers: transformer.* keys of diffusers'
    unfused layers, which ComfyUI's loader reads with no unloaded key and samples the same with."""
    got = flow_runs[arch]
    with safe_open(got["diffusers_path"], "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert meta["modelspec.implementation"] == "diffusers"
    split = {"sd3": "transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
             "flux": "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"}[arch]
    assert split in keys
    assert not [m for m in got["diffusers_messages"] if "lora key not loaded" in m or "NOT LOADED" in m]
    torch.testing.assert_close(got["diffusers_loader"], got["loader"], rtol=1e-5, atol=1e-6)


def test_zimage_trains_with_prompts_of_different_token_counts(flow_runs):
    """Z-Image (ComfyUI's ZImage config on its NextDiT): a caption's token count sets the image
    tokens' positions, so a batch of prompts of different lengths runs each at its own length; the
    batched velocity equals each prompt's own."""
    got = flow_runs["zimage"]
    assert (got["family"], got["guided"]) == ("ZImage", False)
    assert got["grouped_error"] == 0.0
