"""Weight files that cannot be read safely are refused by every loader with a message naming the file.

Each loader users reach (reward heads, CLIP towers, the toy classifier, transformers folders and the
training state) meets: a pickle whose unpickling would create a marker file (zip, legacy and raw
pickle formats), an empty file, a truncated file and random bytes. The marker never appears, the
message names the file, and torch's advice to retry with weights_only=False is never passed on.
"""
from __future__ import annotations

import pickle
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from alignprop_core.rewards.aesthetic import load_aesthetic_head
from alignprop_core.rewards.clip_loading import load_comfy_clip_vision, load_open_clip, read_state_dict
from alignprop_core.rewards.hps import make_hps
from alignprop_core.rewards.object_count import make_object_count
from alignprop_core.rewards.toy_count import make_toy_count
from alignprop_core.training.train_state import load_train_state
# tiny transformers folders (PickScore, OWL-ViT) in the real layouts (imported, so pytest uses the fixtures)
from test_rewards_clip import pickscore_dir  # noqa: F401
from test_rewards_detect_mix import detector_dirs  # noqa: F401


class WritesMarker:
    """Unpickling this would create a file: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(path, marker):
    torch.save({"layers.0.weight": WritesMarker(marker)}, path)


def _hostile_legacy(path, marker):
    torch.save({"layers.0.weight": WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)


def _hostile_raw(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"layers.0.weight": WritesMarker(marker)}, f)


def _empty(path, marker):
    path.write_bytes(b"")


def _truncated(path, marker):
    tensors = {"layers.0.weight": torch.zeros(64, 64)}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    path.write_bytes(path.read_bytes()[:-200])


def _random_bytes(path, marker):
    path.write_bytes(torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


FILES = {  # name -> writer
    "hostile.pt": _hostile, "hostile_legacy.pt": _hostile_legacy, "hostile_raw.pth": _hostile_raw,
    "empty.pt": _empty, "truncated.pt": _truncated, "random.bin": _random_bytes,
    "empty.safetensors": _empty, "truncated.safetensors": _truncated, "random.safetensors": _random_bytes,
}
LOADERS = {
    "read_state_dict": read_state_dict,
    "aesthetic head": load_aesthetic_head,
    "hps checkpoint": make_hps,
    "open_clip checkpoint": lambda path: load_open_clip("ViT-B-32", path),
    "clip_vision file": load_comfy_clip_vision,
    "toy classifier": lambda path: make_toy_count(weights_path=str(path)),
    "training state": load_train_state,
}


@pytest.mark.parametrize("file_name", list(FILES))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_unreadable_weight_file_is_named_and_never_run(loader, file_name, tmp_path):
    marker = tmp_path / "PICKLE_RAN"
    path = tmp_path / file_name
    FILES[file_name](path, marker)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal is an error, never a warning plus a traceback
        with pytest.raises(ValueError) as err:
            LOADERS[loader](path)
    message = str(err.value)
    assert str(path) in message and "weights_only=False" not in message, message
    assert "\n" not in message, message
    assert not marker.exists(), "a pickle ran code"


def test_messages_say_what_was_refused(tmp_path):
    marker = tmp_path / "PICKLE_RAN"
    _hostile(tmp_path / "hostile.pt", marker)
    _empty(tmp_path / "empty.pt", marker)
    with pytest.raises(ValueError, match=r"hostile\.pt is not a PyTorch state dict that can be read safely "
                                         r".*GLOBAL io\.open.* use the \.safetensors version"):
        read_state_dict(tmp_path / "hostile.pt")
    with pytest.raises(ValueError, match=r"empty\.pt is empty \(0 bytes\)"):
        read_state_dict(tmp_path / "empty.pt")


def test_legacy_format_state_dict_still_loads(tmp_path):
    """The legacy (non-zip) torch.save format is fine when it holds only tensors."""
    torch.save({"layers.0.weight": torch.ones(2, 2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "legacy.pt")["layers.0.weight"], torch.ones(2, 2))


@pytest.mark.parametrize("weights, writer", [
    ("model.safetensors", _truncated), ("model.safetensors", _random_bytes),
    ("pytorch_model.bin", _hostile), ("pytorch_model.bin", _hostile_raw), ("pytorch_model.bin", _empty),
])
def test_transformers_folder_with_unreadable_weights_names_the_file(weights, writer, detector_dirs, tmp_path):  # noqa: F811
    folder = tmp_path / "owlvit"
    shutil.copytree(detector_dirs["owlvit"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE_RAN"
    writer(folder / weights, marker)
    with pytest.raises(ValueError) as err:
        make_object_count(folder, "cat", target=2)
    message = str(err.value)
    assert f"{folder / weights} cannot be read" in message and "weights_only=False" not in message, message
    assert not marker.exists(), "a pickle ran code"


def test_pickscore_folder_with_unreadable_weights_names_the_file(pickscore_dir, tmp_path):  # noqa: F811
    from alignprop_core.rewards.pickscore import make_pickscore

    folder = tmp_path / "PickScore_v1"
    shutil.copytree(pickscore_dir, folder)
    _truncated(folder / "model.safetensors", tmp_path / "unused")
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read \(SafetensorError: .*PickScore_v1"):
        make_pickscore(folder)
