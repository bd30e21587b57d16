"""The ComfyUI flow backend (nodes/comfy_flow.py) on real ComfyUI SD3 and FLUX.1 MODELs equals the
diffusers backends on the same tiny weights (flow_twins.py; the ComfyUI side runs in a subprocess).

Prompt embeddings are the same random context / pooled tensors on both sides (building ComfyUI's
CLIP-L/G + T5 or CLIP-L + T5 from configs would dominate the run time); the backend's prompt encoder
is run on a stand-in CLIP that returns random tensors, for its shapes only. Checked per family:
- `flow_schedule_of` gives a static-shift schedule whose sigmas equal KSampler's "simple" (and for
  SD3 "normal") scheduler, with the model's own shift and after ModelSamplingSD3/Flux nodes;
  non-flow models, other schedulers and image sizes off the patch grid are refused;
- the denoiser's velocity equals the diffusers transformer's at a few sigmas;
- a 4-step sampling run on the ComfyUI backend, without and with CFG, equals one on the diffusers
  denoiser;
- gradients of that run (checkpointed, as the trainer runs it) reach a LoRA injected into
  ComfyUI's diffusion model and equal the gradients of the same LoRA on the diffusers twin; FLUX
  needs the backend's LayerNorm input copies for that, and none are left on the model afterwards.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import inproc
from flow_twins import FAMILIES
from alignprop_core.config import LoraConfig, SamplerConfig
from alignprop_core.lora import add_lora
from alignprop_core.models.flux_model import flux_denoiser
from alignprop_core.models.sd3_model import sd3_denoiser
from alignprop_core.sampling.flow_schedule import FlowSchedule
from alignprop_core.sampling.sampler import sample_latents

pytestmark = pytest.mark.slow

BATCH, TOKENS, SIDE, STEPS = 2, 3, 8, 4
SIGMAS = (0.9, 0.5, 0.1)
RANK, ALPHA = 2, 3.0
# (diffusers layer, the same layer in ComfyUI's model): unfused on both sides, so one LoRA fits both
LORA_PAIRS = {
    "sd3": (("transformer_blocks.0.ff_context.net.2", "joint_blocks.0.context_block.mlp.fc2"),
            ("transformer_blocks.1.ff.net.2", "joint_blocks.1.x_block.mlp.fc2"),
            ("proj_out", "final_layer.linear")),
    "flux": (("transformer_blocks.0.ff.net.2", "double_blocks.0.img_mlp.2"),
             ("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj"),
             ("single_transformer_blocks.0.proj_out", "single_blocks.0.linear2")),
}
# ComfyUI's model_sampling shift of each tiny model's config (SD3: 3.0; FLUX.1-dev: mu = 1.15)
EXPECTED = {"sd3": FlowSchedule(shift=3.0, sigma_grid="flux", patch_size=2),
            "flux": FlowSchedule(shift=math.exp(1.15), sigma_grid="flux", patch_size=2)}
SAMPLER = SamplerConfig(steps=STEPS, use_cfg=False, guidance_scale=1.0, checkpoint_unet=False)
# classifier-free guidance: both branches batched in one call
CFG_SAMPLER = SamplerConfig(steps=STEPS, use_cfg=True, guidance_scale=4.0, checkpoint_unet=False)
# the trainer's path for the gradient run: every step of the window under the reentrant checkpoint
GRAD_SAMPLER = SamplerConfig(steps=STEPS, use_cfg=False, guidance_scale=1.0, checkpoint_unet=True)

# argv after comfy_dir, base_dir: results path, then per family arch, weights, JSON config, inputs.
_SCRIPT = r"""
import dataclasses, json, sys, types
import torch
import inproc
inproc.setup(sys.argv[1], sys.argv[2])
import comfy.model_base, comfy.samplers, comfy.utils
from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3
from flow_twins import StandInClip, comfy_flow_model
from test_comfy_flow_backend import CFG_SAMPLER, GRAD_SAMPLER, LORA_PAIRS, RANK, ALPHA, SAMPLER, STEPS
from alignprop_core.config import LoraConfig
from alignprop_core.lora import add_lora
from alignprop_core.sampling.chain import flow_chain
from alignprop_core.sampling.sampler import sample_latents
from ComfyUI_AlignProp.nodes.comfy_flow import flow_arch, flow_backend, flow_schedule_of


def grid(schedule, steps):
    chain = flow_chain(schedule, steps, (8, 8))
    return [s.sigma for s in chain] + [0.0]


def schedules(patcher, arch):
    rows = []
    patched = [("model", patcher)]
    if arch == "sd3":
        patched.append(("ModelSamplingSD3 shift 5", ModelSamplingSD3().patch(patcher, 5.0)[0]))
    else:
        patched.append(("ModelSamplingFlux 512x512", ModelSamplingFlux().patch(patcher, 1.15, 0.5, 512, 512)[0]))
    for label, m in patched:
        ms = m.get_model_object("model_sampling")
        for kind in ("simple", "normal") if arch == "sd3" else ("simple",):
            schedule = flow_schedule_of(m, kind)
            for n in (STEPS, 10, 7):
                fn = comfy.samplers.simple_scheduler if kind == "simple" else comfy.samplers.normal_scheduler
                rows.append((f"{label} {kind} {n}", grid(schedule, n), fn(ms, n).tolist(), len(ms.sigmas),
                             schedule.shift))
    return rows


def refused(fn, *args):
    try:
        fn(*args)
    except ValueError as error:
        return str(error)
    return None


eps = comfy.model_base.model_sampling(None, comfy.model_base.ModelType.EPS)
results = {"refusals": {
    "eps sampling": refused(flow_schedule_of, types.SimpleNamespace(get_model_object=lambda name: eps)),
    "not a flow model": refused(flow_arch, types.SimpleNamespace(model=torch.nn.Identity())),
}}
args = sys.argv[4:]
for arch, weights, extra, inputs_path in zip(*[args[i::4] for i in range(4)]):
    io = comfy.utils.load_torch_file(inputs_path, safe_load=True)
    patcher = comfy_flow_model(weights, extra)
    clip = StandInClip(io["context"].shape[-1], io["pooled"].shape[-1])
    vae = types.SimpleNamespace(first_stage_model=torch.nn.Conv2d(16, 3, 1), downscale_ratio=8)
    results["refusals"][f"{arch} unknown scheduler"] = refused(flow_schedule_of, patcher, "karras")
    if arch == "flux":  # its 10000-entry table ends below what FlowSchedule's default grid can express
        results["refusals"]["flux normal scheduler"] = refused(flow_schedule_of, patcher, "normal")
    results["refusals"][f"{arch} image size"] = refused(flow_backend, patcher, clip, vae, 64, 72)
    backend = flow_backend(patcher, clip, vae, 64, 64, name="tiny")
    encoded = backend.encode_prompts(["a", "a longer prompt"])
    cond = {k: io[k] for k in ("context", "pooled", "guidance") if k in io}
    uncond = {k: io["un_" + k] if "un_" + k in io else v for k, v in cond.items()}
    velocities = []
    with torch.no_grad():
        for sigma in io["sigmas"].tolist():
            t = torch.full((io["probe"].shape[0],), 1000.0 * sigma)
            velocities.append(backend.denoiser(io["probe"], t, cond))
        sampled = sample_latents(backend.denoiser, backend.schedule, io["x_T"], cond, None, SAMPLER, 0)
        guided = sample_latents(backend.denoiser, backend.schedule, io["x_T"], cond, uncond, CFG_SAMPLER, 0)
    pairs = LORA_PAIRS[arch]
    add_lora(backend.lora_target, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=tuple(c for _, c in pairs)))
    params = []
    with torch.no_grad():
        for i, (_, name) in enumerate(pairs):
            layer = backend.lora_target.get_submodule(name)
            layer.lora_A["default"].weight.copy_(io[f"A{i}"])
            layer.lora_B["default"].weight.copy_(io[f"B{i}"])
            params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x0 = sample_latents(backend.denoiser, backend.schedule, io["x_T"], cond, None, GRAD_SAMPLER, STEPS)
    (x0 * io["weights"]).sum().backward()
    grads = [p.grad for p in params]
    results[arch] = {
        "fields": {k: v for k, v in dataclasses.asdict(backend.schedule).items()},
        "backend": {"arch": backend.arch, "patch_size": backend.patch_size,
                    "guidance_input": backend.guidance_input, "default_guidance": backend.default_guidance,
                    "latent_channels": backend.latent_channels, "lora_target": type(backend.lora_target).__name__},
        "encoded": {k: list(v.shape) for k, v in encoded.items()},
        "schedules": schedules(patcher, arch),
        "velocities": torch.stack(velocities),
        "sampled": sampled,
        "guided": guided,
        "grads": list(grads),
        "hooks_left": sum(len(m._forward_pre_hooks) for m in backend.lora_target.modules()),
    }
torch.save(results, sys.argv[3])
"""


def twin_inputs(arch: str, base) -> dict[str, torch.Tensor]:
    """The shared inputs: probe latents, x_T, random conditioning, loss weights and LoRA factors."""
    cfg = base.config
    g = torch.Generator().manual_seed(5)
    io = {"probe": torch.randn(BATCH, 16, SIDE, SIDE, generator=g),
          "x_T": torch.randn(BATCH, 16, SIDE, SIDE, generator=g),
          "weights": torch.randn(BATCH, 16, SIDE, SIDE, generator=g),
          "context": torch.randn(BATCH, TOKENS, cfg.joint_attention_dim, generator=g),
          "pooled": torch.randn(BATCH, cfg.pooled_projection_dim, generator=g),
          "un_context": torch.randn(BATCH, TOKENS + 2, cfg.joint_attention_dim, generator=g),
          "un_pooled": torch.randn(BATCH, cfg.pooled_projection_dim, generator=g),
          "sigmas": torch.tensor(SIGMAS)}
    if arch == "flux":
        io["guidance"] = torch.tensor([3.5, 2.0])
    for i, (name, _) in enumerate(LORA_PAIRS[arch]):
        layer = base.get_submodule(name)
        io[f"A{i}"] = torch.randn(RANK, layer.in_features, generator=g) * 0.3
        io[f"B{i}"] = torch.randn(layer.out_features, RANK, generator=g) * 0.3
    return io


def diffusers_side(arch: str, base, io: dict[str, torch.Tensor]) -> dict:
    """What the diffusers denoiser gives for the same inputs: velocities, a sampling run, LoRA grads."""
    make_denoiser = sd3_denoiser if arch == "sd3" else flux_denoiser
    cond = {k: io[k] for k in ("context", "pooled", "guidance") if k in io}
    uncond = {k: io["un_" + k] if "un_" + k in io else v for k, v in cond.items()}
    schedule = EXPECTED[arch]
    with torch.no_grad():
        denoise = make_denoiser(base)
        velocities = torch.stack([denoise(io["probe"], torch.full((BATCH,), 1000.0 * s), cond) for s in SIGMAS])
        sampled = sample_latents(denoise, schedule, io["x_T"], cond, None, SAMPLER, 0)
        guided = sample_latents(denoise, schedule, io["x_T"], cond, uncond, CFG_SAMPLER, 0)
    model = copy.deepcopy(base)
    pairs = LORA_PAIRS[arch]
    add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=tuple(d for d, _ in pairs)))
    params = []
    with torch.no_grad():
        for i, (name, _) in enumerate(pairs):
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(io[f"A{i}"])
            layer.lora_B["default"].weight.copy_(io[f"B{i}"])
            params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x0 = sample_latents(make_denoiser(model), schedule, io["x_T"], cond, None, GRAD_SAMPLER, STEPS)
    (x0 * io["weights"]).sum().backward()
    return {"velocities": velocities, "sampled": sampled, "guided": guided, "grads": [p.grad for p in params]}


@pytest.fixture(scope="module")
def both_sides(comfy_dir, tmp_path_factory):
    """``(ComfyUI results per family and "refusal", diffusers results per family)``."""
    tmp = tmp_path_factory.mktemp("comfy-flow-backend")
    args, ours = [], {}
    for arch, spec in FAMILIES.items():
        base = spec["make"](**spec["sizes"])
        weights = tmp / f"{arch}_transformer.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
        io = twin_inputs(arch, base)
        inputs = tmp / f"{arch}_inputs.safetensors"
        save_file(io, str(inputs))
        args += [arch, str(weights), json.dumps(spec["comfy_config"]), str(inputs)]
        ours[arch] = diffusers_side(arch, base, io)
    out = tmp / "results.pt"
    inproc.run_script(_SCRIPT, comfy_dir, tmp / "base", str(out), *args, timeout=300)
    return torch.load(out, weights_only=True), ours


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_backend_describes_the_model(arch, both_sides):
    got = both_sides[0][arch]
    assert got["backend"] == {"arch": arch, "patch_size": 2, "guidance_input": arch == "flux",
                              "default_guidance": 3.5 if arch == "flux" else None, "latent_channels": 16,
                              "lora_target": "OpenAISignatureMMDITWrapper" if arch == "sd3" else "Flux"}
    expected = EXPECTED[arch]
    assert got["fields"]["use_dynamic_shifting"] is False
    assert got["fields"]["shift"] == pytest.approx(expected.shift, rel=1e-12)
    assert {k: v for k, v in got["fields"].items() if k != "shift"} == {
        k: getattr(expected, k) for k in got["fields"] if k != "shift"}
    width = {"sd3": 16, "flux": 16}[arch]  # joint_attention_dim of the tiny models
    # the longer prompt's tokens set the length; the shorter one is repeated up to it
    assert got["encoded"]["context"][0] == 2 and got["encoded"]["context"][2] == width
    assert got["encoded"]["pooled"][0] == 2


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_sigmas_equal_ksampler_schedulers(arch, both_sides):
    rows = both_sides[0][arch]["schedules"]
    assert any(label.startswith("ModelSampling") for label, *_ in rows)  # a node-set shift is covered
    for label, ours, theirs, table, shift in rows:
        ours, theirs = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
        steps = len(ours) - 1
        if steps == 7 and "simple" in label:
            # ComfyUI rounds the table index down when the step count does not divide the table;
            # each sigma is then off by at most one table entry (slope of the shift <= shift)
            assert (ours - theirs).abs().max() <= shift / table + 1e-6, label
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6, msg=label)  # float32 table


def test_bad_models_and_settings_are_refused(both_sides):
    refusals = both_sides[0]["refusals"]
    expected = {"eps sampling": "not a rectified flow (CONST)",
                "not a flow model": "this MODEL is Identity",
                "sd3 unknown scheduler": "use one of simple, normal",
                "flux unknown scheduler": "use one of simple, normal",
                "flux normal scheduler": "use scheduler='simple'",
                "sd3 image size": "multiples of 16",
                "flux image size": "multiples of 16"}
    assert set(refusals) == set(expected)
    for case, words in expected.items():
        assert refusals[case] is not None and words in refusals[case], (case, refusals[case])


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_velocity_equals_diffusers(arch, both_sides):
    got, ours = both_sides[0][arch], both_sides[1][arch]
    assert ours["velocities"].abs().mean() > 0.1  # a real output, not zeros
    torch.testing.assert_close(got["velocities"], ours["velocities"], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_sampling_run_equals_diffusers(arch, both_sides):
    got, ours = both_sides[0][arch], both_sides[1][arch]
    torch.testing.assert_close(got["sampled"], ours["sampled"], rtol=1e-4, atol=5e-5)
    # with CFG (a negative prompt of another token length, batched with the prompt)
    assert not torch.allclose(ours["guided"], ours["sampled"], atol=1e-2)
    torch.testing.assert_close(got["guided"], ours["guided"], rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_lora_gradient_equals_diffusers(arch, both_sides):
    got, ours = both_sides[0][arch], both_sides[1][arch]
    assert len(got["grads"]) == 2 * len(LORA_PAIRS[arch])
    for i, (g_comfy, g_ours) in enumerate(zip(got["grads"], ours["grads"])):
        assert torch.isfinite(g_comfy).all() and g_comfy.abs().max() > 0, i
        scale = g_ours.abs().max().item()
        torch.testing.assert_close(g_comfy, g_ours, rtol=1e-3, atol=1e-4 * scale, msg=f"param {i}")
    assert got["hooks_left"] == 0  # the LayerNorm input copies are undone after each call
