"""SD3 and FLUX.1 LoRA files written by ``save_lora`` are loaded whole by the real ComfyUI (inproc.py).

For each family a tiny diffusers transformer (``tiny_flow_transformers``, resized to what ComfyUI's
detection assumes: SD3's 64-wide attention heads, one head per block; FLUX's 16-channel latents
packed 2x2 into 64) gets a random LoRA on every linear layer with alpha != rank, and is saved with
``save_lora(arch=...)``. A ComfyUI process then loads the transformer's weights as its diffusion
model loader does (``convert_diffusers_mmdit``, ``detect_unet_config``; FLUX's head count and rotary
axes cannot be read from weights, so they are given), and the LoRA as LoraLoaderModelOnly does
(``comfy.sd.load_lora_for_models``), and patches the weights. Checked here:

- every key of the file is consumed (no "lora key not loaded" / "NOT LOADED" warning), one patch
  per LoRA module, each on a weight the model has;
- a few modules land where the diffusers layer lives in ComfyUI's fused layout (q/k/v rows of a
  fused qkv, a single block's MLP rows of ``linear1``, the swapped halves of ``norm_out``), written
  out here by hand;
- every patched weight moved by exactly our delta ``B @ A * alpha / r`` in its slice, and no
  weight moved anywhere else;
- the patched ComfyUI model computes what our LoRA-injected diffusers transformer computes (and
  before patching, what the bare one computes: the two sides are compared on the same inputs).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_flow_transformers import run_transformer

import inproc
from flow_twins import FAMILIES
from alignprop_core.config import LoraConfig
from alignprop_core.lora import add_lora, save_lora

pytestmark = pytest.mark.slow

RANK, ALPHA = 2, 3.0
DM = "diffusion_model."


def _rows(start: int, length: int) -> tuple:
    return (0, start, length)


def hand_targets(arch: str, hidden: int) -> dict[str, tuple[str, tuple | None, str | None]]:
    """Where a few diffusers layers live in ComfyUI's model: ``(weight, (dim, start, length) or None,
    transform)``, read from the two layouts (MMDiT ``joint_blocks``; Flux ``double_blocks`` /
    ``single_blocks``, whose ``linear1`` stacks q, k, v and the 4x-wide MLP input)."""
    h = hidden
    swap = (f"{DM}final_layer.adaLN_modulation.1.weight", None, "swap_scale_shift")  # (shift, scale) order
    if arch == "sd3":
        block = f"{DM}joint_blocks"
        return {"transformer_blocks.0.attn.to_k": (f"{block}.0.x_block.attn.qkv.weight", _rows(h, h), None),
                "transformer_blocks.0.attn2.to_v": (f"{block}.0.x_block.attn2.qkv.weight", _rows(2 * h, h), None),
                "transformer_blocks.1.attn.add_q_proj": (f"{block}.1.context_block.attn.qkv.weight",
                                                         _rows(0, h), None),
                "transformer_blocks.0.ff_context.net.2": (f"{block}.0.context_block.mlp.fc2.weight", None, None),
                "norm_out.linear": swap}
    return {"transformer_blocks.0.attn.to_v": (f"{DM}double_blocks.0.img_attn.qkv.weight", _rows(2 * h, h), None),
            "transformer_blocks.0.attn.add_k_proj": (f"{DM}double_blocks.0.txt_attn.qkv.weight", _rows(h, h), None),
            "single_transformer_blocks.0.attn.to_q": (f"{DM}single_blocks.0.linear1.weight", _rows(0, h), None),
            "single_transformer_blocks.0.proj_mlp": (f"{DM}single_blocks.0.linear1.weight", _rows(3 * h, 4 * h),
                                                     None),
            "single_transformer_blocks.0.proj_out": (f"{DM}single_blocks.0.linear2.weight", None, None),
            "norm_out.linear": swap}


# Runs in a ComfyUI process. argv after comfy_dir, base_dir: the results path, then per family
# arch, transformer weights (diffusers names), LoRA file, JSON of the undetectable config entries,
# and the diffusers call's inputs (FLUX latents already unpacked to (B, 16, H, W), as ComfyUI takes them).
_SCRIPT = r"""
import json, sys
import torch
import inproc
inproc.setup(sys.argv[1], sys.argv[2])
import comfy.lora, comfy.sd, comfy.utils
from flow_twins import comfy_flow_model


def run(arch, diffusion_model, io):
    with torch.no_grad():
        if arch == "sd3":
            return diffusion_model(io["hidden_states"], io["timestep"], context=io["encoder_hidden_states"],
                                   y=io["pooled_projections"])
        return diffusion_model(io["hidden_states"], io["timestep"], io["encoder_hidden_states"],
                               y=io["pooled_projections"], guidance=io["guidance"])


def describe(target):
    if isinstance(target, str):
        return (target, None, None)
    fn = target[2].__name__ if len(target) > 2 else None
    return (target[0], None if target[1] is None else tuple(target[1]), fn)


results = {}
args = sys.argv[4:]
for arch, base_path, lora_path, extra, inputs_path in zip(*[args[i::5] for i in range(5)]):
    patcher = comfy_flow_model(base_path, extra)
    model = patcher.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    io = comfy.utils.load_torch_file(inputs_path, safe_load=True)
    base_out = run(arch, model.diffusion_model, io)

    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with inproc.warnings_logged() as warnings:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        patched.patch_model()
    after = patched.model.state_dict()
    lora_out = run(arch, patched.model.diffusion_model, io)
    modules = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    results[arch] = {
        "model_class": type(model).__name__,
        "messages": warnings,
        "targets": {x: describe(key_map[x]) for x in modules if x in key_map},
        "patched": sorted(patched.patches),
        "patch_count": sum(len(v) for v in patched.patches.values()),
        "base_out": base_out,
        "lora_out": lora_out,
        "deltas": {k: after[k].double() - before[k].double() for k in after if not torch.equal(after[k], before[k])},
    }
torch.save(results, sys.argv[3])
"""


def swap_halves(delta: torch.Tensor) -> torch.Tensor:
    """ComfyUI stores diffusers' (shift, scale) modulation rows as (scale, shift)."""
    first, second = delta.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def unpack_latents(tokens: torch.Tensor) -> torch.Tensor:
    """FLUX's packed tokens (B, h*w, C*2*2) as the latent image (B, C, 2h, 2w) ComfyUI's Flux takes
    (a 4x4 token grid, as ``flux_inputs`` makes)."""
    b, c = tokens.shape[0], tokens.shape[2] // 4
    return tokens.reshape(b, 4, 4, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 8, 8)


def lora_family(arch: str, tmp_path):
    """Save a random LoRA (every linear layer, alpha != rank) of the family's tiny transformer, and the
    inputs of one call; return the transformer's weights path, the LoRA path, the inputs path, the
    outputs without and with the LoRA (in ComfyUI's layout), ``{module: delta W}`` and the hidden size."""
    spec = FAMILIES[arch]
    base = spec["make"](**spec["sizes"])
    weights = tmp_path / f"{arch}_transformer.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    inputs = spec["inputs"](base)
    layout = unpack_latents if arch == "flux" else (lambda x: x)
    outputs = [layout(run_transformer(base, inputs))]
    model = copy.deepcopy(base)
    targets = tuple(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear))
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in add_lora(model, cfg):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # lora_B non-zero, so every delta is too
    path = save_lora(tmp_path / f"{arch}_lora.safetensors", model, cfg, arch=arch)
    deltas = {name: layer.get_delta_weight("default").double()  # B @ A * alpha / r
              for name, layer in model.named_modules() if hasattr(layer, "lora_A")}
    assert set(deltas) == set(targets)
    outputs.append(layout(run_transformer(model, inputs)))
    inputs_path = tmp_path / f"{arch}_inputs.safetensors"
    save_file({k: layout(v) if k == "hidden_states" else v.contiguous() for k, v in inputs.items()},
              str(inputs_path))
    hidden = base.config.num_attention_heads * base.config.attention_head_dim
    return weights, path, inputs_path, outputs, deltas, hidden


@pytest.fixture(scope="module")
def comfy_results(comfy_dir, tmp_path_factory):
    """Both families' LoRAs loaded and applied in one ComfyUI process: ``({arch: results},
    {arch: (deltas, hidden, lora path, diffusers outputs without and with the LoRA)})``."""
    tmp = tmp_path_factory.mktemp("lora-flow-comfy")
    args, ours = [], {}
    for arch, spec in FAMILIES.items():
        weights, path, inputs_path, outputs, deltas, hidden = lora_family(arch, tmp)
        args += [arch, str(weights), str(path), json.dumps(spec["comfy_config"]), str(inputs_path)]
        ours[arch] = (deltas, hidden, path, outputs)
    out = tmp / "results.pt"
    inproc.run_script(_SCRIPT, comfy_dir, tmp / "base", str(out), *args, timeout=300)
    return torch.load(out, weights_only=True), ours


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_comfyui_loads_every_key_of_our_file(arch, comfy_results):
    from safetensors.torch import load_file

    results, ours = comfy_results
    got, (deltas, _, path, _) = results[arch], ours[arch]
    assert got["model_class"] == {"sd3": "SD3", "flux": "Flux"}[arch]
    skipped = [m for m in got["messages"] if "lora key not loaded" in m or "NOT LOADED" in m]
    assert not skipped, skipped
    file_modules = {k.rsplit(".lora_", 1)[0] for k in load_file(str(path)) if ".lora_" in k}
    assert file_modules == {f"transformer.{name}" for name in deltas}
    assert set(got["targets"]) == file_modules  # every module is in ComfyUI's key map
    assert got["patch_count"] == len(file_modules)  # and became exactly one patch
    assert {t[0] for t in got["targets"].values()} == set(got["patched"])  # on weights the model has


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_comfyui_puts_each_layer_where_diffusers_has_it(arch, comfy_results):
    results, ours = comfy_results
    got, (_, hidden, _, _) = results[arch], ours[arch]
    for name, target in hand_targets(arch, hidden).items():
        assert got["targets"][f"transformer.{name}"] == target, name


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_comfyui_patched_weights_move_by_exactly_our_delta(arch, comfy_results):
    results, ours = comfy_results
    got, (deltas, _, _, _) = results[arch], ours[arch]
    expected: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        weight, offset, transform = got["targets"][f"transformer.{name}"]
        full = expected.setdefault(weight, torch.zeros_like(got["deltas"][weight]))
        part = full if offset is None else full.narrow(*offset)
        if transform not in (None, "swap_scale_shift"):
            raise AssertionError(f"{name}: unexpected ComfyUI weight transform {transform}")
        part += swap_halves(delta) if transform == "swap_scale_shift" else delta
    assert set(got["deltas"]) == set(expected)  # no other weight moved
    for weight, delta in expected.items():
        # float32 weights: the error is the rounding of the patched weight
        torch.testing.assert_close(got["deltas"][weight], delta, rtol=1e-4, atol=1e-6, msg=weight)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_comfyui_patched_model_computes_what_our_lora_model_computes(arch, comfy_results):
    results, ours = comfy_results
    got, (_, _, _, (base_out, lora_out)) = results[arch], ours[arch]
    torch.testing.assert_close(got["base_out"], base_out, rtol=1e-4, atol=1e-5)  # same model, same call
    assert not torch.allclose(lora_out, base_out, atol=1e-2)  # the LoRA does act
    torch.testing.assert_close(got["lora_out"], lora_out, rtol=1e-4, atol=1e-5)
