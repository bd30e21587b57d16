"""The command line: a short real run writes every artefact; bad input gives a clear error, exit 2."""
from __future__ import annotations

import csv
import json

import pytest

from alignprop_core.cli import main
from alignprop_core.lora_io import load_lora
from alignprop_core.tiny_model import ensure_tiny_model_dir

FAST = ["--sampler-steps", "3", "--sampler-k", "2", "--steps", "3", "--batch-size", "2",
        "--width", "16", "--height", "16", "--eval-every", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# animals\ncat\ndog\n\nhorse\n")
    return path


def test_train_writes_lora_metrics_and_plots(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--prompts", str(prompt_file),
                 "--eval-prompts", str(prompt_file), "--out", str(out), "--reward", "smoothness", *FAST])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    for name in ("alignprop_lora.safetensors", "metrics.csv", "metrics.json", "reward_curve.png",
                 "before_after.png"):
        assert (out / name).stat().st_size > 0, name
    lora = load_lora(out / "alignprop_lora.safetensors")
    assert lora.metadata["alignprop.step"] == "3" and lora.metadata["alignprop.reward"] == "smoothness"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[2]["eval_reward"] != "" and rows[1]["eval_reward"] == ""


@pytest.mark.parametrize("flags, message", [
    (["--sampler-truncation", "random"], "invalid choice|is not known"),
    (["--sampler-k", "9"], "k=9 is outside [1, steps=3]"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lora-rank", "0"], "rank must be > 0"),
    (["--sampler-guidance-scale", "0.5"], "guidance_scale=0.5 is below 1"),
    (["--width", "15"], "multiples of the VAE factor 2"),
])
def test_bad_settings_are_named(model_dir, prompt_file, tmp_path, capsys, flags, message):
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(tmp_path),
            *FAST, *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects unknown choices itself
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert any(part in err for part in message.split("|")), err
    assert not (tmp_path / "alignprop_lora.safetensors").exists()


def test_missing_model_dir_and_empty_prompt_file(prompt_file, tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--prompts", str(prompt_file)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert main(["train", "--model", str(tmp_path), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_raises_the_held_out_reward(tmp_path, capsys):
    """The README's `make demo`: the shipped toy model learns to draw the requested counts."""
    code = main(["demo", "--out", str(tmp_path / "demo")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["held_out_reward_end"] > summary["held_out_reward_start"] + 0.1
    report_start, report_end = summary["held_out_report_start"], summary["held_out_report_end"]
    assert report_end["count_accuracy"] > report_start["count_accuracy"]
    # the weight-free referee agrees: more images show as many separate blobs as requested
    assert report_end["counted_blobs_accuracy"] > report_start["counted_blobs_accuracy"]
    assert (tmp_path / "demo" / "before_after.png").exists()
