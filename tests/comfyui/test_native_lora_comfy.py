"""LoRAs trained on the real ComfyUI SD3 and FLUX.1 diffusion models (their own fused layers), saved by
``save_lora``, are read back by ComfyUI's LoRA loader, by our loader and, for FLUX, by diffusers.

In a ComfyUI process (inproc.py), per family, on the tiny weights of ``flow_twins``: our LoRA is
injected (``add_lora``) into every linear layer of ComfyUI's ``diffusion_model`` (fused qkv, proj,
MLPs, modulations, FLUX's ``linear1``: q, k, v and the MLP input in one layer) with alpha != rank and
random non-zero factors, and saved with ``save_lora(arch=...)``. Then, each on a fresh model:

- ComfyUI's LoraLoaderModelOnly path (``comfy.sd.load_lora_for_models``) consumes every key (no
  "lora key not loaded" warning), one patch per module, and the patched model computes what the
  LoRA-injected one computes;
- ``load_lora`` + ``apply_lora_file`` give back the same LoRA, output for output, bit for bit.

diffusers' ``FluxPipeline.load_lora_weights`` converts kohya FLUX files (splitting a fused qkv into
to_q/to_k/to_v) but takes FLUX.1's full sizes for ``single_blocks.N.linear1``; a second FLUX LoRA
without ``linear1`` is loaded into the diffusers twin, which then computes what ComfyUI's model
with that LoRA computes. diffusers reads no kohya SD3 file.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_flow_transformers import run_transformer

import inproc
from flow_twins import FAMILIES
from test_lora_flow_comfy import unpack_latents

pytestmark = pytest.mark.slow

RANK, ALPHA = 2, 3.0
# Per case: the family and the regular expression of the target layers (every linear layer; for the
# diffusers check, the layers of FLUX's double blocks and linear2, which diffusers converts at any size).
CASES = {"sd3": ("sd3", r".*"), "flux": ("flux", r".*"),
         "flux-diffusers": ("flux", r"(double_blocks\..*|single_blocks\.\d+\.linear2)"),
         # every layer native_keys converts to the diffusers form: attention (fused qkv, proj), MLPs, linear1/2
         "sd3-convert": ("sd3", r"joint_blocks\.\d+\.(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc[12])"),
         "flux-convert": ("flux", r"(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                                  r"|single_blocks\.\d+\.linear[12])")}

# Runs in a ComfyUI process. argv after comfy_dir, base_dir: the results path, the output folder, then
# per case: name, arch, transformer weights (diffusers names), JSON of the undetectable config entries,
# target regex and the inputs of one call (in ComfyUI's layout).
_SCRIPT = r"""
import json, re, sys
import torch
import inproc
inproc.setup(sys.argv[1], sys.argv[2])
import comfy.lora, comfy.sd, comfy.utils
from flow_twins import comfy_flow_model
from alignprop_core.config import LoraConfig
from alignprop_core.lora import add_lora, apply_lora_file, load_lora, lora_state_dict, save_lora


def run(arch, dm, io):
    with torch.no_grad():
        if arch == "sd3":
            return dm(io["hidden_states"], io["timestep"], context=io["encoder_hidden_states"],
                      y=io["pooled_projections"])
        return dm(io["hidden_states"], io["timestep"], io["encoder_hidden_states"], y=io["pooled_projections"],
                  guidance=io["guidance"])


results, out_dir = {}, sys.argv[4]
args = sys.argv[5:]
for name, arch, weights, extra, pattern, inputs_path in zip(*[args[i::6] for i in range(6)]):
    io = comfy.utils.load_torch_file(inputs_path, safe_load=True)
    base_out = run(arch, comfy_flow_model(weights, extra).model.diffusion_model, io)

    # 1. train-side: our LoRA on ComfyUI's own layers, saved
    tuned = comfy_flow_model(weights, extra).model.diffusion_model
    targets = tuple(n for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n))
    cfg = LoraConfig(rank=2, alpha=3.0, target_modules=targets)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in add_lora(tuned, cfg):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # lora_B non-zero, so every delta is too
    lora_out = run(arch, tuned, io)
    path = save_lora(f"{out_dir}/{name}.safetensors", tuned, cfg, arch=arch)

    # 2. ComfyUI's LoraLoaderModelOnly path on a fresh model
    patcher = comfy_flow_model(weights, extra)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with inproc.warnings_logged() as warnings:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        patched.patch_model()
    comfy_out = run(arch, patched.model.diffusion_model, io)

    # 3. our loader on a fresh model
    fresh = comfy_flow_model(weights, extra).model.diffusion_model
    apply_lora_file(fresh, load_lora(path, module=fresh))
    ours, want = lora_state_dict(fresh), lora_state_dict(tuned)
    modules = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    results[name] = {
        "targets": list(targets), "path": str(path), "messages": warnings,
        "in_key_map": sorted(m for m in modules if m in key_map),
        "patch_count": sum(len(v) for v in patched.patches.values()),
        "base_out": base_out, "lora_out": lora_out, "comfy_out": comfy_out, "reloaded_out": run(arch, fresh, io),
        "same_state": ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want),
    }
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def comfy_results(comfy_dir, tmp_path_factory):
    """Every case trained, saved and loaded in one ComfyUI process: ``({case: results},
    {arch: (diffusers twin, its inputs)})``."""
    tmp = tmp_path_factory.mktemp("lora-comfy-naming")
    args, twins = [], {}
    for arch, spec in FAMILIES.items():
        base = spec["make"](**spec["sizes"])
        weights = tmp / f"{arch}_transformer.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
        inputs = spec["inputs"](base)
        layout = unpack_latents if arch == "flux" else (lambda x: x)
        inputs_path = tmp / f"{arch}_inputs.safetensors"
        save_file({k: layout(v) if k == "hidden_states" else v.contiguous() for k, v in inputs.items()},
                  str(inputs_path))
        twins[arch] = (base, inputs, weights, inputs_path)
    for name, (arch, pattern) in CASES.items():
        _, _, weights, inputs_path = twins[arch]
        args += [name, arch, str(weights), json.dumps(FAMILIES[arch]["comfy_config"]), pattern, str(inputs_path)]
    out = tmp / "results.pt"
    inproc.run_script(_SCRIPT, comfy_dir, tmp / "base", str(out), str(tmp), *args, timeout=300)
    return torch.load(out, weights_only=True), {a: t[:2] for a, t in twins.items()}


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_the_file_names_comfyuis_fused_layers(case, comfy_results):
    results, _ = comfy_results
    got = results[case]
    keys = set(load_file(got["path"]))
    fused = {"sd3": ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.attn.qkv",
                     "joint_blocks.0.x_block.attn2.qkv"),
             "flux": ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1")}
    assert set(fused[case]) <= set(got["targets"])
    expected = {f"lora_unet_{t.replace('.', '_')}.{part}" for t in got["targets"]
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected


@pytest.mark.parametrize("case", list(CASES))
def test_comfyuis_lora_loader_consumes_every_key_and_computes_our_output(case, comfy_results):
    results, _ = comfy_results
    got = results[case]
    skipped = [m for m in got["messages"] if "lora key not loaded" in m or "NOT LOADED" in m]
    assert not skipped, skipped
    modules = {f"lora_unet_{t.replace('.', '_')}" for t in got["targets"]}
    assert set(got["in_key_map"]) == modules and got["patch_count"] == len(modules)
    assert not torch.allclose(got["lora_out"], got["base_out"], atol=1e-2)  # the LoRA does act
    # merged float32 weights against the unmerged LoRA: rounding only (alpha / r = 1.5 honoured)
    torch.testing.assert_close(got["comfy_out"], got["lora_out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_our_loader_gives_the_same_lora_back_bit_for_bit(case, comfy_results):
    results, _ = comfy_results
    got = results[case]
    assert got["same_state"]
    assert torch.equal(got["reloaded_out"], got["lora_out"])


def test_diffusers_reads_the_kohya_flux_file_of_comfyuis_double_blocks(comfy_results):
    from peft.tuners.lora import LoraLayer
    from test_lora_flow import captured_messages, make_pipeline

    results, twins = comfy_results
    got = results["flux-diffusers"]
    base, inputs = twins["flux"]
    pipe = make_pipeline("flux", copy.deepcopy(base))
    with captured_messages() as messages:
        pipe.load_lora_weights(got["path"])
    others = [m for m in messages if not m.startswith("No LoRA keys associated to")]
    assert not others, others
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    # each fused qkv became three diffusers layers; every other layer one
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2", "norm1.linear", "norm1_context.linear")
    assert loaded == {f"transformer_blocks.0.{n}" for n in double} | {"single_transformer_blocks.0.proj_out"}
    out = unpack_latents(run_transformer(pipe.transformer, inputs))
    torch.testing.assert_close(out, got["lora_out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["sd3-convert", "flux-convert"])
def test_diffusers_reads_the_converted_file_of_comfyuis_fused_layers(case, comfy_results, tmp_path):
    """``diffusers_lora_file`` splits each fused layer's LoRA (qkv, FLUX's linear1) exactly: diffusers'
    load_lora_weights takes every key of the converted file with no warning, and the diffusers twin
    with it computes what ComfyUI's model with the kohya file computes."""
    from peft.tuners.lora import LoraLayer
    from test_lora_flow import captured_messages, make_pipeline

    from alignprop_core.lora import diffusers_lora_file, load_lora, save_lora_file

    results, twins = comfy_results
    got, arch = results[case], CASES[case][0]
    base, inputs = twins[arch]
    lora, family = diffusers_lora_file(load_lora(got["path"]))
    path = save_lora_file(tmp_path / f"{case}.safetensors", lora, arch=family)
    pipe = make_pipeline(arch, copy.deepcopy(base))
    with captured_messages() as messages:
        pipe.load_lora_weights(str(path))
    others = [m for m in messages if not m.startswith("No LoRA keys associated to")]
    assert not others, others
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert loaded == {k[len("transformer."):].rsplit(".", 2)[0] for k in lora.state if k.endswith("lora_A.weight")}
    assert len(loaded) > len(got["targets"])  # the fused layers became their parts
    out = run_transformer(pipe.transformer, inputs)
    out = unpack_latents(out) if arch == "flux" else out
    torch.testing.assert_close(out, got["lora_out"], rtol=1e-4, atol=1e-5)
