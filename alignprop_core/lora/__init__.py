"""LoRA: injection through peft, key names per model family, the safetensors file, shape and value
checks, and mixing.

Code outside this package imports from here, not from the submodules:

* ``inject``: peft LoRA layers on a module (add, remove, state, scale, turn off for a base pass,
  the size of the weight change),
* ``file``: the ``.safetensors`` file (``LoraFile``; save, load, check, apply), and a LoRA from
  tensors without a file (``lora_from_state``),
* ``keys``: peft <-> kohya keys (UNet files; SD3/FLUX files of ComfyUI's models), the module naming
  a file uses, its metadata,
* ``transformer_keys``: the diffusers key form of SD3/FLUX files, reading either form,
* ``native_keys``: a LoRA of ComfyUI's (fused) SD3/FLUX layers rewritten in that diffusers form,
* ``families``: the model family of a model or a file, cross-family refusal, default targets,
* ``unet_paths``: UNet module paths in LDM and diffusers naming, and the layout mapping them,
* ``check``: finite values and factor shapes that fit the target layers,
* ``mix``: interpolating two LoRAs.
"""
from .check import check_factors, check_lora_finite
from .file import (LoraFile, apply_lora_file, check_lora_fits, load_lora, lora_from_state, lora_modules,
                   save_lora, save_lora_file)
from .families import DEFAULT_TARGETS, check_family, file_archs, lora_preset, metadata_arch, model_arch
from .inject import (adapters_off, add_lora, has_lora, lora_delta_l2, lora_parameters, lora_rank_alpha,
                     lora_state_dict, remove_lora, set_lora_scale, set_lora_state_dict)
from .keys import (CANONICAL_NAMING, LORA_ARCHS, convert_names, kohya_name, kohya_to_peft, lora_metadata,
                   peft_to_kohya)
from .mix import MIX_MODES, mix_loras
from .native_keys import diffusers_lora_file, native_to_diffusers
from .transformer_keys import group_lora, lora_to_peft, peft_to_diffusers
from .unet_paths import RESNET_LAYERS, UNetLayout, ldm_to_diffusers_paths, naming_of, unet_layout

__all__ = [
    # inject
    "add_lora", "remove_lora", "has_lora", "lora_parameters", "lora_state_dict", "set_lora_state_dict",
    "lora_rank_alpha", "set_lora_scale", "adapters_off", "lora_delta_l2",
    # file
    "LoraFile", "save_lora", "save_lora_file", "load_lora", "lora_from_state", "apply_lora_file",
    "check_lora_fits", "lora_modules",
    # check
    "check_lora_finite", "check_factors",
    # mix
    "mix_loras", "MIX_MODES",
    # keys and UNet paths
    "kohya_to_peft", "peft_to_kohya", "kohya_name", "convert_names", "lora_metadata", "CANONICAL_NAMING",
    "naming_of", "unet_layout", "UNetLayout", "ldm_to_diffusers_paths", "RESNET_LAYERS", "LORA_ARCHS",
    # transformer (SD3/FLUX) keys and families
    "peft_to_diffusers", "group_lora", "lora_to_peft", "native_to_diffusers", "diffusers_lora_file",
    "model_arch", "metadata_arch", "file_archs", "check_family", "lora_preset", "DEFAULT_TARGETS",
]
