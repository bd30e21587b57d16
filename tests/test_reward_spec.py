"""Rewards as data: a `RewardSpec` reads back from its one-line text, builds the reward it names, and
travels with a run (command line -> LoRA metadata -> metrics.json -> training state), so a resume with
another reward is refused naming both."""
from __future__ import annotations

import json

import pytest
import torch

from alignprop_core.cli import main
from alignprop_core.lora import load_lora
from alignprop_core.models.tiny_model import ensure_tiny_model_dir
from alignprop_core.rewards import REWARDS, Reward, build_reward, make_reward
from alignprop_core.rewards.mixture import make_mixture, mixture_spec
from alignprop_core.rewards.spec import RewardSpec, parse_value

from test_cli import FAST

SPECS = [
    RewardSpec("smoothness"),
    RewardSpec("color_target", {"target": (1.0, 0.55, 0.1)}),
    RewardSpec("aesthetic", {"head_path": "/models/a b;c]/head=1.pth", "clip_arch": "ViT-L-14"}),
    RewardSpec("toy_count", {"attributes": ["count", "colour"], "temperature": 0.5, "kind": "prob",
                             "weights_path": None}),
    RewardSpec("object_count", {"object_name": "3", "target": 3, "threshold": None, "model_dir": "true"}),
    RewardSpec("mixture", {"spec": "aesthetic:1[toward=10], jpeg_compressibility:0.5", "standardize": True}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_the_text_reads_back_as_the_same_spec(spec):
    text = spec.text()
    assert "\n" not in text
    assert RewardSpec.parse(text) == spec
    assert RewardSpec.parse(f"  {text} ") == spec


def test_arguments_are_recorded_as_json_values():
    spec = RewardSpec("color_target", {"target": (1, 0, 0)})
    assert spec.args == {"target": [1, 0, 0]} and spec.text() == "color_target[target=[1, 0, 0]]"
    assert RewardSpec("x", {"b": 1, "a": 2}).text() == "x[a=2; b=1]"  # keys sorted: one text per spec
    # a string that would read back as another value is quoted
    assert RewardSpec("x", {"a": "3", "b": "none"}).text() == 'x[a="3"; b="none"]'
    assert parse_value("True") is True and parse_value("none") is None and parse_value("1e-3") == 1e-3
    assert parse_value("/a/b.pth") == "/a/b.pth" and parse_value("[1, 2]") == [1, 2]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("aesthetic[head_path=x", "cannot read"),
    ("9lives", "cannot read"),
    ("aesthetic[head_path]", "not 'key=value'"),
])
def test_malformed_text_is_refused_saying_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec.parse(text)


def test_a_value_that_is_not_data_is_refused():
    with pytest.raises(ValueError, match="device.*cannot record.*run-time argument"):
        RewardSpec("hps", {"device": torch.device("cpu")})


def test_built_rewards_carry_their_spec_and_runtime_arguments_stay_out():
    reward = make_reward("color_target", target=(0.0, 1.0, 0.0))
    assert isinstance(reward, Reward)
    assert reward.spec == RewardSpec("color_target", {"target": [0.0, 1.0, 0.0]})
    again = build_reward(reward.spec.text())
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(again(images, ["a", "b"]), reward(images, ["a", "b"]))
    with pytest.raises(ValueError, match="unknown reward 'nope'.*smoothness"):
        build_reward("nope[a=1]")


def test_runtime_arguments_reach_the_factory_but_not_the_spec(monkeypatch):
    seen = {}

    def factory(scale: float = 1.0, device="cpu"):
        seen.update(scale=scale, device=device)
        return lambda images, prompts: images.mean((1, 2, 3)) * scale

    monkeypatch.setitem(REWARDS, "scaled", factory)
    reward = make_reward("scaled", scale=2.0, device="meta")
    assert seen == {"scale": 2.0, "device": "meta"} and reward.spec == RewardSpec("scaled", {"scale": 2.0})


def test_a_mixture_of_built_rewards_records_a_spec_that_builds_the_same_mixture():
    parts = [(make_reward("smoothness"), 1.0), (make_reward("color_target", target=[1, 0, 0]), 0.5)]
    spec = mixture_spec([(r.spec, w) for r, w in parts], standardize=True)
    mixed = make_mixture(parts, standardize=True, spec=spec)
    rebuilt = build_reward(RewardSpec.parse(mixed.spec.text()))
    assert rebuilt.spec == mixed.spec and spec.label == "1.0*smoothness + 0.5*color_target"
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(rebuilt(images, ["a"] * 4), mixed(images, ["a"] * 4))
    assert rebuilt.state_dict() == mixed.state_dict()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def _train(model_dir, out, *flags):
    prompts = out.parent / "prompts.txt"
    prompts.write_text("cat\ndog\n")
    return main(["train", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                 *FAST, "--eval-every", "0", *flags])


def test_the_spec_goes_from_the_command_line_into_the_lora_and_metrics(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(model_dir, out, "--reward", "color_target", "--reward-arg", "target=[1,0,0]") == 0
    capsys.readouterr()
    written = load_lora(out / "alignprop_lora.safetensors").metadata["alignprop.reward"]
    assert RewardSpec.parse(written) == RewardSpec("color_target", {"target": [1, 0, 0]})
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["train"]["reward"] == written
    # the LoRA's line is a valid --reward: the same run again gives the same LoRA
    again = tmp_path / "again"
    assert _train(model_dir, again, "--reward", written) == 0
    a, b = load_lora(out / "alignprop_lora.safetensors"), load_lora(again / "alignprop_lora.safetensors")
    assert a.metadata["alignprop.reward"] == b.metadata["alignprop.reward"]
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_resume_continues_the_same_spec_and_refuses_another_naming_both(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    reward = ["--reward", "color_target", "--reward-arg", "target=[1,0,0]"]
    assert _train(model_dir, out, *reward, "--save-every", "3") == 0
    state = out / "train_state.pt"
    assert state.is_file()
    capsys.readouterr()
    other = ["--reward", "color_target[target=[0, 1, 0]]"]
    code = _train(model_dir, tmp_path / "other", *other, "--resume", str(state), "--steps", "4")
    err = capsys.readouterr().err
    assert code == 2
    assert "color_target[target=[1, 0, 0]]" in err and "color_target[target=[0, 1, 0]]" in err, err
    assert not (tmp_path / "other" / "alignprop_lora.safetensors").exists()
    code = _train(model_dir, tmp_path / "same", *reward, "--resume", str(state), "--steps", "4")
    assert code == 0, capsys.readouterr().err
    assert load_lora(tmp_path / "same" / "alignprop_lora.safetensors").metadata["alignprop.step"] == "4"
