"""Guards against reward hacking: judges and diversity in every evaluation, the best LoRA kept as
<name>-best, early stopping, and the toy world's weight-free toy_blobs judge; on the tiny model."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math

import pytest
import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import load_lora
from alignprop_core.rewards import Reward, RewardSpec, make_reward
from alignprop_core.run_log import write_metrics
from alignprop_core.toy.shapes import MAX_COUNT, caption_for, generate
from alignprop_core.training.best import best_index, stalled
from alignprop_core.training.diversity import downsample, held_out_diversity, mean_pairwise_rms
from alignprop_core.training.evaluate import eval_entries, evaluate
from alignprop_core.training.run import TrainRun
from alignprop_core.training.trainer import train
from test_trainer import _stop_after
from tiny_models import make_backend

PROMPTS = ["a cat", "a dog", "a horse", "a cow", "a fish", "a bird"]
EVAL = ["a fox", "a lion", "a duck", "a goat"]
BEST = "alignprop_lora-best.safetensors"


def _configs(**train_kw):
    sampler = SamplerConfig(steps=4, guidance_scale=3.0, truncation="uniform", k_min=2, k_max=4)
    kw = dict(reward="color_target", steps=6, batch_size=2, lr=1e-2, width=16, height=16, eval_every=2,
              seed=0)
    kw.update(train_kw)
    return sampler, LoraConfig(rank=4, alpha=4.0), TrainConfig(**kw)


class Scripted(Reward):
    """A judge whose score at its n-th evaluation is values[n] for every image: it peaks where the test
    wants. Evaluations are counted by `scoring_only`, which each evaluation enters once."""

    def __init__(self, values, start=0):
        super().__init__(RewardSpec("scripted"))
        self.values, self.evaluations = list(values), start

    @contextlib.contextmanager
    def scoring_only(self):
        yield
        self.evaluations += 1

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), float(self.values[self.evaluations]))


def _train(out_dir=None, judge_values=None, start=0, **kw):
    """train() on the tiny model; with `judge_values`, a Scripted judge that picks the best LoRA."""
    judges = [Scripted(judge_values, start)] if judge_values is not None else None
    if judges:
        kw = {"judges": ("scripted",), "best_by": "scripted", **kw}
    sampler, lora, cfg = _configs(**{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__})
    extra = {k: v for k, v in kw.items() if k not in TrainConfig.__dataclass_fields__}
    return train(make_backend(torch.float32), make_reward("color_target"), PROMPTS, EVAL, sampler, lora, cfg,
                 out_dir=out_dir, judges=judges, **extra)


# -- toy_blobs -------------------------------------------------------------------------------------

def test_toy_blobs_is_one_where_the_blob_count_matches_the_prompt():
    images, scenes = generate(24, seed=5)
    judge = make_reward("toy_blobs")
    right = [s.caption for s in scenes]
    wrong = [caption_for(s.count % MAX_COUNT + 1, s.colour, s.shape, s.background) for s in scenes]
    assert judge(images, right).tolist() == [1.0] * 24
    assert judge(images, wrong).tolist() == [0.0] * 24
    # the mean is the blob-count accuracy
    mixed = right[:6] + wrong[6:]
    assert float(judge(images, mixed).mean()) == pytest.approx(6 / 24)
    assert not judge.differentiable and make_reward("toy_count").differentiable
    with pytest.raises(ValueError, match="toy_blobs reward needs prompts of the toy world"):
        judge(images[:1], ["a cat"])


def test_a_reward_that_is_not_differentiable_is_refused_as_the_training_reward():
    sampler, lora, cfg = _configs(reward="toy_blobs")
    with pytest.raises(ValueError, match="toy_blobs is not differentiable; use it as a judge"):
        TrainRun(make_backend(torch.float32), make_reward("toy_blobs"), PROMPTS, EVAL, sampler, lora, cfg)
    mixed = make_reward("mixture", spec="toy_count:1, toy_blobs:1")  # a part without gradient: refused too
    with pytest.raises(ValueError, match="is not differentiable"):
        TrainRun(make_backend(torch.float32), mixed, PROMPTS, EVAL, sampler, lora, dataclasses.replace(
            cfg, reward=mixed.spec.text()))


# -- judges and diversity in the evaluation --------------------------------------------------------

def test_judges_score_the_evaluated_images_and_reach_the_csv(tmp_path):
    sampler, lora, cfg = _configs(judges=("smoothness", "color_target[target=[0, 0, 1]]"), eval_latents=2)
    run = TrainRun(make_backend(torch.float32), make_reward("color_target"), PROMPTS, EVAL, sampler, lora, cfg)
    run.evaluate()
    run.step()
    record = run.evaluate()
    assert set(record) == {"step", "eval_reward", "judges", "diversity"}
    assert list(record["judges"]) == ["smoothness", "color_target"]  # judge_names: the reward names
    scores, images = evaluate(run.backend, run.reward, EVAL, sampler, run.cfg, return_images=True)
    entries = eval_entries(EVAL, run.cfg)
    assert record["eval_reward"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    for name, judge in (("smoothness", make_reward("smoothness")),
                        ("color_target", make_reward("color_target", target=[0, 0, 1]))):
        assert record["judges"][name] == pytest.approx(float(judge(images, entries).mean()), rel=1e-6)
    assert record["diversity"] == pytest.approx(held_out_diversity(images, len(EVAL)), rel=1e-6)

    csv_path, _ = write_metrics(tmp_path, run.history, run.evals, {})
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["step", "reward", "loss", "k", "grad_norm", "skipped", "pull", "lora_l2", "eval_reward",
                             "judge_smoothness", "judge_color_target", "diversity"]
    assert [r["step"] for r in rows] == ["0", "1"]
    assert float(rows[1]["judge_smoothness"]) == record["judges"]["smoothness"]
    assert float(rows[1]["diversity"]) == record["diversity"] and float(rows[0]["diversity"]) > 0
    assert float(rows[1]["pull"]) == 0.0 and float(rows[1]["lora_l2"]) == run.history[0]["lora_l2"]


def test_given_judges_are_recorded_and_best_by_is_checked_against_them():
    sampler, lora, cfg = _configs(judges=("smoothness",), best_by="smoothness")
    backend = make_backend(torch.float32)
    run = TrainRun(backend, make_reward("color_target"), PROMPTS, EVAL, sampler, lora,
                   dataclasses.replace(cfg, best_by="reward"), judges=[Scripted([1.0])])
    assert run.cfg.judges == ("scripted",) and run.config["train"]["judges"] == ["scripted"]
    with pytest.raises(ValueError, match="best_by='smoothness' is not a held-out number"):
        TrainRun(make_backend(torch.float32), make_reward("color_target"), PROMPTS, EVAL, sampler, lora, cfg,
                 judges=[Scripted([1.0])])


def test_diversity_is_zero_for_identical_images_and_none_for_one_latent():
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, 3, 64, 64, generator=g)
    assert held_out_diversity(one.expand(6, -1, -1, -1), 3) == 0.0
    assert held_out_diversity(torch.rand(6, 3, 64, 64, generator=g), 3) > 0.1
    assert held_out_diversity(torch.rand(3, 3, 8, 8, generator=g), 3) is None
    # RMS distance: a constant offset of 0.1 is a distance of 0.1
    assert mean_pairwise_rms(torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.6)])
                             ) == pytest.approx(0.1)
    assert downsample(torch.rand(2, 3, 64, 48)).shape == (2, 3, 32, 32)
    assert downsample(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    # in a run: None with one image per prompt
    result = _train(steps=1, eval_every=0)
    assert [e["diversity"] for e in result.evals] == [None, None] and result.evals[0]["judges"] == {}


def test_best_is_the_first_of_equals_and_ignores_missing_values():
    evals = [{"eval_reward": 1.0, "judges": {"j": math.nan}}, {"eval_reward": 2.0, "judges": {"j": 0.5}},
             {"eval_reward": 2.0, "judges": {}}, {"eval_reward": 1.5, "diversity": None}]
    assert best_index(evals, "reward") == 1 and best_index(evals, "j") == 1
    assert best_index(evals, "diversity") is None
    assert stalled(evals, "reward", 2) and not stalled(evals, "reward", 3) and not stalled(evals, "reward", 0)


# -- the best LoRA and early stopping --------------------------------------------------------------

def test_the_best_lora_is_the_lora_of_the_best_evaluation(tmp_path):
    saved = []
    result = _train(tmp_path, [0.1, 0.5, 0.9, 0.3], save_every=2, on_save=saved.append)
    assert [e["judges"]["scripted"] for e in result.evals] == pytest.approx([0.1, 0.5, 0.9, 0.3])
    assert result.best_step == 4 and result.best_path == tmp_path / BEST
    best, at_4 = load_lora(tmp_path / BEST), load_lora(tmp_path / "alignprop_lora-step00004.safetensors")
    assert best.metadata["alignprop.step"] == "4"
    assert best.state.keys() == at_4.state.keys() and all(torch.equal(best.state[k], at_4.state[k])
                                                          for k in best.state)
    assert saved.count(tmp_path / BEST) == 3  # steps 0, 2 and 4 each improved on the best so far
    assert load_lora(result.lora_path).metadata["alignprop.step"] == "6" and not result.early_stopped


def test_early_stop_ends_a_finished_run_under_the_final_name(tmp_path):
    with pytest.warns(UserWarning, match=r"early stop at step 6: scripted .* \(step 2\) for 2 evaluations"):
        result = _train(tmp_path, [0.1, 0.9, 0.5, 0.4, 0.3], steps=20, early_stop_evals=2)
    assert result.early_stopped and not result.stopped_early
    assert len(result.history) == 6 and [e["step"] for e in result.evals] == [0, 2, 4, 6]
    assert result.lora_path == tmp_path / "alignprop_lora.safetensors"
    assert load_lora(result.lora_path).metadata["alignprop.step"] == "6"
    assert result.best_step == 2 and load_lora(tmp_path / BEST).metadata["alignprop.step"] == "2"
    assert not (tmp_path / "alignprop_lora-partial.safetensors").exists()


def test_an_existing_best_lora_is_refused_without_overwrite(tmp_path):
    (tmp_path / BEST).write_bytes(b"keep me")
    seen = []
    with pytest.raises(FileExistsError, match="alignprop_lora-best.safetensors already exists"):
        _train(tmp_path, steps=2, on_step=lambda step, m: seen.append(step))
    assert seen == [] and sorted(p.name for p in tmp_path.iterdir()) == [BEST]
    result = _train(tmp_path, steps=2, keep_best=False)  # no best kept: nothing to refuse
    assert result.best_path is None and result.best_step is not None
    assert (tmp_path / BEST).read_bytes() == b"keep me"
    result = _train(tmp_path, steps=2, overwrite=True)
    assert result.best_path == tmp_path / BEST and (tmp_path / BEST).read_bytes() != b"keep me"


@pytest.mark.parametrize("last, best_step", [(0.95, 8), (0.4, 2)])
def test_a_resumed_run_recomputes_the_best_from_its_evaluations(tmp_path, last, best_step):
    values = [0.1, 0.9, 0.2, 0.3, last]  # evaluations at steps 0, 2, 4 | 6, 8
    half = _train(tmp_path, values, steps=8, save_every=2, should_stop=_stop_after(4))
    assert half.stopped_early and half.best_step == 2
    # same folder, no overwrite: the resumed run continues the run that wrote the -best file
    result = _train(tmp_path, values, start=3, steps=8, save_every=2,
                    resume_from=tmp_path / "train_state.pt")
    assert [e["judges"]["scripted"] for e in result.evals] == pytest.approx(values)
    assert result.best_step == best_step and result.best_path == tmp_path / BEST
    assert load_lora(tmp_path / BEST).metadata["alignprop.step"] == str(best_step)


def test_a_numbered_name_is_free_only_if_its_best_lora_is_free_too(tmp_path):
    from alignprop_core.files.outputs import numbered_path
    from alignprop_core.training.best import best_lora_name

    requested = tmp_path / "run.safetensors"
    assert numbered_path(requested, (best_lora_name,)) == requested
    (tmp_path / "run-best.safetensors").write_bytes(b"")  # left by a cancelled run
    assert numbered_path(requested) == requested  # without companions only the name itself counts
    assert numbered_path(requested, (best_lora_name,)) == tmp_path / "run_00001.safetensors"


def test_the_evaluation_table_marks_the_best_row_and_names_every_number():
    from alignprop_core.eval_table import evaluation_table

    evals = [{"step": 0, "eval_reward": -2.0, "judges": {"toy_blobs": 0.5}, "diversity": 0.21},
             {"step": 25, "eval_reward": -1.5, "judges": {"toy_blobs": 0.625}, "diversity": 0.2},
             {"step": 50, "eval_reward": -1.25, "judges": {"toy_blobs": 0.5}, "diversity": None}]
    lines = evaluation_table(evals, best_step=25, best_path="/loras/x-best.safetensors",
                             early_stopped=True).splitlines()
    assert lines[0].split() == ["step", "reward", "toy_blobs", "diversity"]
    assert lines[1].split() == ["0", "-2.0000", "0.5000", "0.2100"]
    assert lines[2].split() == ["25", "*", "-1.5000", "0.6250", "0.2000"]
    assert lines[3].split() == ["50", "-1.2500", "0.5000", "-"]
    assert lines[4] == "* best evaluation: step 25, LoRA /loras/x-best.safetensors"
    assert lines[5].startswith("stopped early after step 50")
    assert evaluation_table([]) == "no held-out evaluation was run"
    assert evaluation_table(evals[:1]).splitlines()[0].split() == ["step", "reward", "toy_blobs", "diversity"]
