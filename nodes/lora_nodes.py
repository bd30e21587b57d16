"""LoRA nodes: save, load (to continue training), mix (the paper's adapter interpolation), and
applying a LoRA to a MODEL through ComfyUI's own LoRA patching (what LoraLoader does); and the
conversion between this pack's LoRA and ComfyUI's own LORA_MODEL (the socket of Load LoRA Model and
Save LoRA Weights: a plain dict of key -> tensor, no metadata).

Apply checks the LoRA against the MODEL before patching: ComfyUI itself only logs a layer whose
shapes do not fit and renders without it, so a LoRA for another model would look applied."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from comfy_api.latest import io

from alignprop_core.config import check_finite
from alignprop_core.lora import (MIX_MODES, LoraFile, check_factors, check_family, check_lora_finite,
                                 diffusers_lora_file, file_archs, load_lora, lora_from_state, mix_loras,
                                 save_lora_file)
from alignprop_core.files.outputs import claim, lora_file_name, numbered_path

from .choices import check_combos
from .paths import NO_FILE, existing_path, output_path

Lora = io.Custom("ALIGNPROP_LORA")
LoraModel = io.Custom("LORA_MODEL")  # ComfyUI's own: Load LoRA Model and Save LoRA Weights take it
CATEGORY = "AlignProp/lora"
# (down, up) factor suffixes: kohya (UNet files), diffusers transformer form (SD3/FLUX files)
FACTOR_PAIRS = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"))
SUFFIXES = (*(s for pair in FACTOR_PAIRS for s in pair), "alpha")
KEY_FORMATS = ("as trained", "diffusers")  # Save LoRA: the file's keys as they are, or diffusers' (SD3/FLUX.1)


def _unmatched(state: dict, key_map: dict) -> list[str]:
    """LoRA module names (keys less their factor/alpha suffix) that this MODEL has no weight for."""
    names = set()
    for key in state:
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        names.add(key[: -len(suffix) - 1] if suffix else key)
    return sorted(names - set(key_map))


def check_patch_shapes(model, state: dict, key_map: dict) -> None:
    """ValueError naming the first LoRA key whose factor does not fit the MODEL weight it patches."""
    pairs = [(name, pair) for name in sorted(key_map) for pair in FACTOR_PAIRS
             if all(f"{name}.{f}" in state for f in pair)]
    for name, pair in pairs:
        target = key_map[name]
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        try:
            shape = list(model.get_model_object(key).shape)
        except AttributeError:
            continue  # not a weight of this MODEL: ComfyUI skips it, _unmatched reports the LoRA module
        if offset is not None:  # a slice of a fused weight (dim, start, length)
            shape[offset[0]] = offset[2]
        down_key, up_key = (f"{name}.{f}" for f in pair)
        # exact=False: ComfyUI reshapes the product onto the weight (linear factors on a 1x1 conv work)
        check_factors(down_key, state[down_key], up_key, state[up_key], key.removesuffix(".weight"),
                      shape, exact=False)


def apply_to_model(model, lora: LoraFile, strength: float = 1.0):
    """A clone of `model` with the LoRA as ComfyUI weight patches, after checking that it fits.

    Raises ValueError, before anything is patched, for a NaN/Inf tensor, a LoRA of another model
    family, a factor whose shape does not fit the weight it targets, or LoRA modules this MODEL does
    not have.
    """
    import comfy.lora
    import comfy.lora_convert

    check_lora_finite(lora.state)
    check_family(lora.state, lora.metadata, model.model.diffusion_model)
    state = comfy.lora_convert.convert_lora(dict(lora.state))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    check_patch_shapes(model, state, key_map)
    unmatched = _unmatched(state, key_map)
    if unmatched:
        raise ValueError(f"{len(unmatched)} LoRA module(s) are not in this MODEL (e.g. {unmatched[:3]}): the "
                         "LoRA was made for another model (e.g. SDXL instead of SD1.5); use it with the "
                         "model it was trained for, or pick another LoRA.")
    loaded = comfy.lora.load_lora(state, key_map)
    patched = model.clone()
    applied = set(patched.add_patches(loaded, strength))
    missing = [k for k in loaded if k not in applied]
    if missing or not loaded:
        raise ValueError(f"{len(missing) or 'all'} LoRA modules did not match this MODEL "
                         f"(e.g. {missing[:3]}); the LoRA was trained for another architecture.")
    return patched


def to_lora_model(lora: LoraFile) -> dict[str, torch.Tensor]:
    """ComfyUI's LORA_MODEL of a LoRA: exactly the tensors of its file (same keys, ``.alpha`` included,
    same dtypes), contiguous on the CPU, so Load LoRA Model patches what LoraLoader does with the
    file and Save LoRA Weights can write them as they are."""
    return {key: value.detach().cpu().contiguous() for key, value in lora.state.items()}


def from_lora_model(lora_model) -> LoraFile:
    """This pack's LoRA of a ComfyUI LORA_MODEL: rank, alpha and model family read off its keys, as
    for a file; it has no metadata (no target list, reward spec, steps or base model).

    Raises:
        ValueError: a LORA_MODEL that is not a LoRA of the key forms this pack writes and reads, or
            whose model family its key names do not tell; the message says what was found and what to do.
    """
    fix = ("AlignProp reads the kohya keys its trainer writes (lora_unet_<layer>.lora_down.weight, "
           ".lora_up.weight, .alpha) and the diffusers keys of SD3/FLUX.1 LoRAs (transformer.<layer>.lora_A"
           ".weight, .lora_B.weight): connect AlignProp Trainer's lora_model output, or apply this LoRA with "
           "ComfyUI's Load LoRA Model node instead.")
    if not isinstance(lora_model, Mapping):
        raise ValueError(f"lora_model is a {type(lora_model).__name__}, not a LORA_MODEL (a dict of key names "
                         f"to tensors). {fix}")
    try:
        lora = lora_from_state(lora_model, None, source="the LORA_MODEL on lora_model")
    except ValueError as err:
        raise ValueError(f"lora_model is not a LoRA AlignProp can read: {err} {fix}") from err
    if not file_archs(lora.state)[0]:
        shown = ", ".join(sorted(lora.state)[:3])
        raise ValueError(f"lora_model: its key names (e.g. {shown}) name the layers of no model family "
                         f"AlignProp trains (SD1.x, SDXL, SD3, FLUX.1, Z-Image), so it cannot be checked "
                         f"against a MODEL. {fix}")
    return lora


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_SaveLora", display_name="AlignProp Save LoRA", category=CATEGORY,
            description="writes a LoRA (from the trainer or Load/Mix nodes) to models/loras as a kohya-format "
                        ".safetensors with its metadata; key_format diffusers for SD3/FLUX.1 files diffusers loads",
            is_output_node=True,
            inputs=[Lora.Input("lora", tooltip="LoRA from the trainer, Load or Mix"),
                    io.String.Input("lora_name", default="alignprop/alignprop_lora",
                                    tooltip="file name under models/loras (.safetensors is added)"),
                    io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                                   tooltip="precision of the saved tensors"),
                    # last and optional, so workflows saved before it existed still validate
                    io.Boolean.Input("overwrite", default=False, optional=True,
                                     tooltip="replace a file of the same name; off: the next free "
                                             "numbered name is used (name_00001.safetensors, ...)"),
                    io.Combo.Input("key_format", options=list(KEY_FORMATS), default=KEY_FORMATS[0], optional=True,
                                   tooltip="as trained: kohya keys (LoraLoader, Forge, A1111); diffusers: an "
                                           "SD3/FLUX.1 LoRA of ComfyUI's layers rewritten exactly in the keys "
                                           "diffusers' load_lora_weights reads (ComfyUI reads them too)")],
            outputs=[io.String.Output(display_name="lora_path", tooltip="the file written")])

    @classmethod
    def execute(cls, lora, lora_name, dtype, overwrite=False, key_format=KEY_FORMATS[0]):
        name = lora_file_name(lora_name, "lora_name")
        check_combos(cls.define_schema(), {"dtype": dtype, "key_format": key_format})
        arch = None
        if key_format == "diffusers":
            lora, arch = diffusers_lora_file(lora)
        target = output_path("loras", name, what="lora_name")
        path = claim(target, True, "lora_name") if overwrite else numbered_path(target)
        return io.NodeOutput(str(save_lora_file(path, lora, dtype=dtype, arch=arch)))


class LoadLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="AlignProp_LoadLora", display_name="Load AlignProp LoRA", category=CATEGORY,
            description="loads a LoRA file from models/loras, or takes ComfyUI's LORA_MODEL, as an AlignProp LoRA: "
                        "for Apply LoRA, Mix LoRAs, Save LoRA or the trainer's init_lora",
            inputs=[io.Combo.Input("lora_name", options=[NO_FILE, *(f for f in folder_paths.get_filename_list("loras")
                                                                   if f.endswith(".safetensors"))],
                                   tooltip="a LoRA in models/loras (kohya format); leave at (none) when "
                                           "lora_model is connected"),
                    LoraModel.Input("lora_model", optional=True,
                                    tooltip="instead of a file: ComfyUI's LORA_MODEL, e.g. AlignProp Trainer's "
                                            "lora_model output. It holds the tensors only, not the file's "
                                            "metadata: the reward spec, step count, base model and training "
                                            "settings are lost (AlignProp Save LoRA writes a file without them), "
                                            "the model family is read off the layer names, and as init_lora it "
                                            "trains exactly its own layers")],
            outputs=[Lora.Output(display_name="lora")])

    @classmethod
    def execute(cls, lora_name=NO_FILE, lora_model=None):
        chosen = bool(lora_name) and lora_name != NO_FILE
        if chosen == (lora_model is not None):
            raise ValueError(
                f"Load AlignProp LoRA takes one LoRA: lora_name is {lora_name!r} and a LORA_MODEL is connected to "
                "lora_model; set lora_name to (none) to use the LORA_MODEL, or disconnect lora_model." if chosen else
                "Load AlignProp LoRA has no LoRA: lora_name is (none) and nothing is connected to lora_model; "
                "choose a file in lora_name (models/loras), or connect a LORA_MODEL (e.g. AlignProp Trainer's "
                "lora_model output).")
        if lora_model is not None:
            return io.NodeOutput(from_lora_model(lora_model))
        check_combos(cls.define_schema(), {"lora_name": lora_name})
        return io.NodeOutput(load_lora(existing_path("loras", lora_name)))


class MixLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_MixLoras", display_name="AlignProp Mix LoRAs", category=CATEGORY,
            description="a weighted sum of two LoRAs of the same model family, as one LoRA",
            inputs=[Lora.Input("lora_a", tooltip="LoRA at t = 0"), Lora.Input("lora_b", tooltip="LoRA at t = 1"),
                    io.Float.Input("t", default=0.5, min=-1.0, max=2.0, step=0.01,
                                   tooltip="interpolation weight of lora_b (outside [0,1] extrapolates)"),
                    io.Combo.Input("mode", options=list(MIX_MODES), default="weights",
                                   tooltip="weights: interpolate the LoRA factors per parameter (the paper); "
                                           "delta: interpolate the weight updates ΔW exactly")],
            outputs=[Lora.Output(display_name="lora")])

    @classmethod
    def execute(cls, lora_a, lora_b, t, mode):
        check_finite(t, "t")
        check_combos(cls.define_schema(), {"mode": mode})
        return io.NodeOutput(mix_loras(lora_a, lora_b, t, mode))


class ApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_ApplyLora", display_name="AlignProp Apply LoRA", category=CATEGORY,
            description="applies an AlignProp LoRA to a MODEL (as LoRA patches on a copy; the input MODEL is not "
                        "changed)",
            inputs=[io.Model.Input("model", tooltip="the MODEL to patch"),
                    Lora.Input("lora", tooltip="an AlignProp LoRA (e.g. from Mix LoRAs)"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="LoRA strength")],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, lora, strength):
        check_finite(strength, "strength")
        return io.NodeOutput(apply_to_model(model, lora, strength))


NODES = [SaveLora, LoadLora, MixLoras, ApplyLora]
