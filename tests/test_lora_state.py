"""A LoRA from tensors without a file (``lora_from_state``, what a ComfyUI LORA_MODEL is turned into) and the
layers it patches (``lora_modules``), on a tiny real UNet: the tensors of a saved file give the LoRA that
``load_lora`` reads, less the metadata; a LoRA without a target list continues training on exactly its
own layers; tensors that are not a LoRA of the known key forms are refused by name."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignprop_core.config import LoraConfig
from alignprop_core.lora import (add_lora, apply_lora_file, load_lora, lora_from_state, lora_modules,
                                 lora_state_dict, save_lora)
from test_lora import make_unet, perturb, run

RES_TARGETS = ("to_q", "to_v", "conv1", "time_emb_proj")  # linear and conv LoRA, not the default targets


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 32, generator=g)


@pytest.fixture
def saved(tmp_path):
    """A trained-looking (non-zero) LoRA of alpha != rank on the tiny UNet, saved; (path, the UNet)."""
    unet = make_unet()
    cfg = LoraConfig(rank=2, alpha=3.0, target_modules=RES_TARGETS)
    perturb(add_lora(unet, cfg))
    path = save_lora(tmp_path / "lora.safetensors", unet, cfg, metadata={"alignprop.reward": "smoothness"},
                     arch="sd15")
    return path, unet


def test_the_tensors_of_a_file_give_the_lora_load_lora_reads_less_its_metadata(saved):
    path, _ = saved
    from_file, plain = load_lora(path), lora_from_state(load_file(str(path)))
    assert plain.state.keys() == from_file.state.keys() and any(k.endswith(".alpha") for k in plain.state)
    assert all(torch.equal(plain.state[k], from_file.state[k]) for k in plain.state)
    assert (plain.rank, plain.alpha) == (from_file.rank, from_file.alpha) == (2, 3.0)
    assert plain.metadata == {} and plain.target_modules == ()
    assert from_file.metadata["alignprop.reward"] == "smoothness" and from_file.target_modules == RES_TARGETS
    with_metadata = lora_from_state(load_file(str(path)), from_file.metadata)
    assert with_metadata.metadata == from_file.metadata and with_metadata.target_modules == RES_TARGETS


def test_tensors_come_back_detached_on_the_cpu_in_their_dtype(saved):
    path, _ = saved
    state = {k: torch.nn.Parameter(v.to(torch.float16)) if v.dim() else v for k, v in load_file(str(path)).items()}
    lora = lora_from_state(state)
    assert all(not v.requires_grad and v.device.type == "cpu" for v in lora.state.values())
    assert {v.dtype for k, v in lora.state.items() if not k.endswith(".alpha")} == {torch.float16}


def test_a_lora_without_a_target_list_continues_on_exactly_its_own_layers(saved, inputs):
    path, trained = saved
    lora = lora_from_state(load_file(str(path)))
    fresh = make_unet()
    paths = lora_modules(lora, fresh)
    assert len(paths) == len({k.rsplit(".", 2)[0] for k in lora.state}) and all("." in p for p in paths)
    # the trainer injects LoraConfig(target_modules=...) first, then puts the LoRA's values in
    add_lora(fresh, LoraConfig(rank=lora.rank, alpha=lora.alpha, target_modules=paths))
    apply_lora_file(fresh, lora)
    assert lora_state_dict(fresh).keys() == lora_state_dict(trained).keys()
    torch.testing.assert_close(run(fresh, inputs), run(trained, inputs))
    # the default targets (what such a LoRA used to get) are other layers: refused, not half-loaded
    other = make_unet()
    add_lora(other, LoraConfig(rank=lora.rank, alpha=lora.alpha))
    with pytest.raises(ValueError, match="does not match the injected adapters"):
        apply_lora_file(other, lora)


@pytest.mark.parametrize("state, message", [
    ({"lora_unet_x.lora_down.weight": [[1.0]]}, "1 entry that is not a name and a tensor ('lora_unet_x"),
    ({0: torch.zeros(1)}, "not a name and a tensor (0)"),
    ({"model.weight": torch.zeros(2, 2)}, "holds no lora keys"),
    # ComfyUI's own Train LoRA node names ComfyUI's layers after a diffusion_model. prefix
    ({"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(8, 2),
      "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(2, 8)}, "Unknown LoRA keys (2)"),
    ({"lora_unet_a.lora_down.weight": torch.zeros(2, 8)}, "lacks its lora_down or lora_up weight"),
    ({"lora_unet_a.lora_down.weight": torch.zeros(2, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 2),
      "lora_unet_b.lora_down.weight": torch.zeros(4, 8), "lora_unet_b.lora_up.weight": torch.zeros(8, 4)},
     "Inconsistent LoRA ranks/alphas"),
])
def test_what_is_not_a_lora_is_refused_saying_what_was_found(state, message):
    with pytest.raises(ValueError) as err:
        lora_from_state(state, source="the test's tensors")
    assert message in str(err.value), str(err.value)


def test_the_source_is_named():
    with pytest.raises(ValueError, match="^the LORA_MODEL on lora_model holds no lora keys"):
        lora_from_state({"x": torch.zeros(1)}, source="the LORA_MODEL on lora_model")
