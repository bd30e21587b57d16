"""LoRA nodes: save, load (to continue training), mix (the paper's adapter interpolation), and
applying a LoRA to a MODEL through ComfyUI's own LoRA patching (what LoraLoader does)."""
from __future__ import annotations

from comfy_api.latest import io

from alignprop_core.lora_io import LoraFile, load_lora, mix_loras, save_lora_file

from .paths import existing_path, output_path

Lora = io.Custom("ALIGNPROP_LORA")
CATEGORY = "AlignProp/lora"
MIX_MODES = ("weights", "delta")


def apply_to_model(model, lora: LoraFile, strength: float = 1.0):
    """A clone of `model` with the LoRA as ComfyUI weight patches; errors if any key is not used."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora.state)), key_map)
    patched = model.clone()
    applied = set(patched.add_patches(loaded, strength))
    missing = [k for k in loaded if k not in applied]
    if missing or not loaded:
        raise ValueError(f"{len(missing) or 'all'} LoRA modules did not match this MODEL "
                         f"(e.g. {missing[:3]}); the LoRA was trained for another architecture.")
    return patched


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_SaveLora", display_name="AlignProp Save LoRA", category=CATEGORY,
            is_output_node=True,
            inputs=[Lora.Input("lora", tooltip="LoRA from the trainer, Load or Mix"),
                    io.String.Input("lora_name", default="alignprop/alignprop_lora",
                                    tooltip="file name under models/loras (.safetensors is added)"),
                    io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                                   tooltip="precision of the saved tensors")],
            outputs=[io.String.Output(display_name="lora_path")])

    @classmethod
    def execute(cls, lora, lora_name, dtype):
        path = save_lora_file(output_path("loras", lora_name), lora, dtype=dtype)
        return io.NodeOutput(str(path))


class LoadLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="AlignProp_LoadLora", display_name="Load AlignProp LoRA", category=CATEGORY,
            inputs=[io.Combo.Input("lora_name", options=[f for f in folder_paths.get_filename_list("loras")
                                                         if f.endswith(".safetensors")],
                                   tooltip="a LoRA in models/loras (kohya format)")],
            outputs=[Lora.Output(display_name="lora")])

    @classmethod
    def execute(cls, lora_name):
        return io.NodeOutput(load_lora(existing_path("loras", lora_name)))


class MixLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_MixLoras", display_name="AlignProp Mix LoRAs", category=CATEGORY,
            inputs=[Lora.Input("lora_a", tooltip="LoRA at t = 0"), Lora.Input("lora_b", tooltip="LoRA at t = 1"),
                    io.Float.Input("t", default=0.5, min=-1.0, max=2.0, step=0.01,
                                   tooltip="interpolation weight of lora_b (outside [0,1] extrapolates)"),
                    io.Combo.Input("mode", options=list(MIX_MODES), default="weights",
                                   tooltip="weights: interpolate the LoRA factors per parameter (the paper); "
                                           "delta: interpolate the weight updates ΔW exactly")],
            outputs=[Lora.Output(display_name="lora")])

    @classmethod
    def execute(cls, lora_a, lora_b, t, mode):
        return io.NodeOutput(mix_loras(lora_a, lora_b, t, mode))


class ApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_ApplyLora", display_name="AlignProp Apply LoRA", category=CATEGORY,
            inputs=[io.Model.Input("model", tooltip="the MODEL to patch"),
                    Lora.Input("lora", tooltip="an AlignProp LoRA (e.g. from Mix LoRAs)"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="LoRA strength")],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, lora, strength):
        return io.NodeOutput(apply_to_model(model, lora, strength))


NODES = [SaveLora, LoadLora, MixLoras, ApplyLora]
