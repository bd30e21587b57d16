"""The command line: a short real run writes every artefact; every bad invocation is one line
`alignprop: error: ...` on stderr with exit code 2, names the flag or file, and writes nothing. The
bad invocations are the CLI rows of the bad-input catalogue, tests/failure_catalogue.py."""
from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from alignprop_core import reporting
from alignprop_core.cli import _configs_from_args, build_parser, main
from alignprop_core.lora import load_lora
from alignprop_core.models.tiny_model import ensure_tiny_model_dir
from alignprop_core.training.train_state import TrainState, save_train_state

from failure_catalogue import CLI_ROWS, BadInput

FAST = ["--sampler-steps", "3", "--sampler-k", "2", "--steps", "3", "--batch-size", "2",
        "--width", "16", "--height", "16", "--eval-every", "2", "--lr", "1e-2"]


class WritesMarker:
    """Unpickling this would create a file: a stand-in for a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# animals\ncat\ndog\n\nhorse\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_dir):
    """Every bad input of the table, written once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    f = {"root": root, "marker": root / "PICKLE_RAN"}
    torch.save({"state": WritesMarker(f["marker"])}, root / "hostile.pt")
    with open(root / "hostile_raw.pt", "wb") as out:
        pickle.dump(WritesMarker(f["marker"]), out)
    torch.save({"step": WritesMarker(f["marker"])}, root / "legacy.pt", _use_new_zipfile_serialization=False)
    (root / "empty.pt").write_bytes(b"")
    torch.save({"step": 1, "lora": {"a": torch.zeros(64)}}, root / "whole.pt")
    data = (root / "whole.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(torch.randint(0, 256, (400,), dtype=torch.uint8,
                                                   generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    torch.save(torch.zeros(3), root / "tensor.pt")
    save_train_state(root / "train_state.pt", TrainState(step=1, lora={"a": torch.zeros(2)}, optimizer={},
                                                         scaler={}, generator=torch.Generator().get_state()))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "no_prompts.txt").write_text("# only a comment\n\n")
    (root / "a_folder").mkdir()
    (root / "not_a_model").mkdir()
    (root / "model.safetensors").write_bytes(b"not a folder")
    # the tiny model with a VAE of 4 blocks (factor 8): the check reads the config, loads nothing
    vae8 = root / "vae8"
    shutil.copytree(model_dir, vae8)
    config = json.loads((vae8 / "vae" / "config.json").read_text())
    config["block_out_channels"] = [8, 8, 8, 8]
    (vae8 / "vae" / "config.json").write_text(json.dumps(config))
    # a folder of a pipeline AlignProp does not train, and a FLUX.1 folder's configs (patch size 2)
    _write_configs(root / "kandinsky", "KandinskyPipeline", "unet")
    _write_configs(root / "flux_configs", "FluxPipeline", "transformer")
    (root / "existing").mkdir()
    (root / "existing" / "alignprop_lora.safetensors").write_bytes(b"a finished LoRA")
    (root / "out_is_a_file").write_text("x")
    return f


def _write_configs(folder: Path, pipeline: str, denoiser: str) -> None:
    """Only the JSON configs the CLI reads before loading: model_index.json, vae/ and the denoiser's."""
    for sub in ("vae", denoiser):
        (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [16, 32]}))
    (folder / denoiser / "config.json").write_text(json.dumps({"patch_size": 1}))


def _flags(row: BadInput, files: dict) -> list[str]:
    """The row's extra arguments with {files} replaced by the folder of prepared bad files."""
    return [arg.replace("{files}", str(files["root"])) for arg in row.given]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def _tree(folder: Path) -> list[tuple[str, bytes]] | None:
    if not folder.exists():
        return None
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"")
                  for p in folder.rglob("*"))


def _must_not_load(*args, **kwargs):
    raise AssertionError("a bad invocation reached model loading")


@pytest.mark.parametrize("row", CLI_ROWS, ids=[row.id for row in CLI_ROWS])
def test_bad_invocation_is_one_line_exit_2_and_writes_nothing(row, model_dir, prompt_file, files, tmp_path,
                                                               capsys, monkeypatch):
    """Each CLI row of the bad-input catalogue (tests/failure_catalogue.py)."""
    monkeypatch.setattr(reporting, "run_and_report", _must_not_load)
    flags = _flags(row, files)
    out = Path(flags[flags.index("--out") + 1]) if "--out" in flags else tmp_path / "out"
    before = _tree(out)
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(out),
            "--reward", "color_target", "--device", "cpu", *FAST, *flags]
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignprop: error: "), err
    for excerpt in row.expect:
        assert excerpt in err, (excerpt, err)
    assert row.named_by in err, err
    assert _tree(out) == before
    assert not files["marker"].exists(), "a pickle ran code"


def test_cuda_without_a_gpu_is_named(model_dir, prompt_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = _run(["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out",
                      str(tmp_path / "out"), "--device", "cuda"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device cuda: no cuda device" in err, err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(model_dir, prompt_file, files, tmp_path, capsys):
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(tmp_path),
            "--resume", str(files["root"] / "truncated.pt")]
    code, err = _run([*argv, "--debug"], capsys)
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("alignprop: error: training state")


def test_unexpected_errors_are_one_line_too(model_dir, prompt_file, tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(reporting, "run_and_report", fails)
    code, err = _run(["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out",
                      str(tmp_path / "new" / "out"), *FAST], capsys)
    assert code == 2
    assert err == ("alignprop: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB "
                   "(run with --debug for details)\n")
    assert not (tmp_path / "new").exists()  # the folders the run made for its output are gone again


def test_interrupt_before_training_exits_130(model_dir, prompt_file, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reporting, "run_and_report", interrupted)
    code, err = _run(["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out",
                      str(tmp_path / "out"), *FAST], capsys)
    assert (code, err) == (130, "alignprop: interrupted.\n")


def test_overwrite_and_the_checked_name_reach_the_trainer(model_dir, prompt_file, files, tmp_path, capsys,
                                                          monkeypatch):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(reporting, "run_and_report", record)
    out = tmp_path / "existing"
    shutil.copytree(files["root"] / "existing", out)
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(out),
            "--lora-name", "alignprop_lora", *FAST]
    assert _run(argv, capsys)[0] == 2
    assert _run([*argv, "--overwrite"], capsys)[0] == 0
    assert seen["overwrite"] is True and seen["lora_name"] == "alignprop_lora.safetensors"


def test_penalty_flags_reach_the_train_config():
    argv = ["train", "--model", "m", "--prompts", "p.txt", "--kl-weight", "0.5", "--lora-l2-weight", "2e-3"]
    train = _configs_from_args(build_parser().parse_args(argv))[2]
    assert (train.kl_weight, train.lora_l2_weight) == (0.5, 2e-3)
    defaults = _configs_from_args(build_parser().parse_args(argv[:5]))[2]
    assert (defaults.kl_weight, defaults.lora_l2_weight) == (0.0, 0.0)
    with pytest.raises(ValueError, match="--kl-weight"):
        _configs_from_args(build_parser().parse_args([*argv[:5], "--kl-weight", "-1"]))


def test_train_writes_lora_metrics_and_plots(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--prompts", str(prompt_file), "--eval-prompts",
            str(prompt_file), "--out", str(out), "--reward", "smoothness", *FAST]
    code = main(argv)
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
    # the same command again would replace the finished LoRA: refused before loading anything
    code, err = _run(argv, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err, err


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


@pytest.mark.parametrize("command", ["train", "demo"])
def test_judge_flags_reach_the_config(command):
    from alignprop_core.cli import _configs_from_args, build_parser

    base = [command] + (["--model", "m", "--prompts", "p"] if command == "train" else [])
    _, _, cfg = _configs_from_args(build_parser().parse_args(
        [*base, "--judges", "toy_blobs", "smoothness[]", "--best-by", "toy_blobs", "--no-keep-best",
         "--early-stop-evals", "3"]))
    assert (cfg.judges, cfg.best_by, cfg.keep_best, cfg.early_stop_evals) == (
        ("toy_blobs", "smoothness"), "toy_blobs", False, 3)
    _, _, default = _configs_from_args(build_parser().parse_args(base))
    assert default.judges == (("toy_blobs",) if command == "demo" else ()) and default.keep_best
    _, _, none = _configs_from_args(build_parser().parse_args([*base, "--judges"]))
    assert none.judges == ()


def test_an_unknown_judge_or_best_by_is_one_line(capsys):
    code, err = _run(["demo", "--judges", "toy_blobz"], capsys)
    assert code == 2 and "--judges" in err and "toy_blobz" in err, err
    code, err = _run(["demo", "--best-by", "clip_score", "--out", "/nonexistent/x"], capsys)
    assert code == 2 and "--best-by='clip_score' is not a held-out number" in err, err


def test_headline_shows_judges_diversity_and_the_best_step():
    from alignprop_core.cli import _headline

    summary = {"held_out_reward_start": -1.2344, "held_out_reward_end": -0.9871,
               "held_out_judges_start": {"toy_blobs": 0.52}, "held_out_judges_end": {"toy_blobs": 0.61},
               "diversity_start": 0.21, "diversity_end": 0.19,
               "held_out_report_start": {"counted_blobs_accuracy": 0.5},
               "held_out_report_end": {"counted_blobs_accuracy": 0.6},
               "best_step": 25, "best_lora": "out/alignprop_lora-best.safetensors", "steps": 50}
    assert _headline("toy count", summary) == (
        "held-out toy count: -1.234 -> -0.987; judge toy_blobs 0.52 -> 0.61; diversity 0.210 -> 0.190; "
        "counted blobs accuracy 0.50 -> 0.60; best LoRA: step 25 (kept as -best)")
    assert _headline("toy count", {**summary, "best_step": 50, "diversity_start": None}) == (
        "held-out toy count: -1.234 -> -0.987; judge toy_blobs 0.52 -> 0.61; "
        "counted blobs accuracy 0.50 -> 0.60")
