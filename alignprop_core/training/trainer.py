"""The AlignProp training loop: `train()` runs a `TrainRun` to the end and writes its files.

Each optimiser step (see `training.step`): draw prompts and x_T, draw K once, sample through the DDIM
chain with the last K steps differentiable and checkpointed, decode, score with the reward,
backpropagate into the LoRA weights only, and take an AdamW step. Every random draw comes from one
`torch.Generator` whose state is saved with the run, so the same seed gives the same LoRA and a resumed
run is bit-identical to an uninterrupted one (on the CPU). Nothing here knows ComfyUI: progress and
cancellation come in through the `on_step` and `should_stop` callbacks.

Every evaluation (`TrainRun.evaluate`) also picks the best LoRA so far by `TrainConfig.best_by` (see
`training.best`): with `keep_best` it is written as `<name>-best.safetensors` beside the final one,
and with `early_stop_evals` the run ends once that number stops improving.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import LoraConfig, SamplerConfig, TrainConfig
from ..files.outputs import check_writable, claim, lora_file_name, partial_path
from ..lora import LoraFile
from ..models.backend import DiffusionBackend
from ..parallel.world import World, single_process
from ..rewards import Reward, RewardFn
from .best import best_index, best_lora_name, stalled
from .run import TrainRun, check_run_inputs
from .train_state import load_train_state

OnStep = Callable[[int, dict[str, Any]], None]
SKIPPED_IN_A_ROW = 5  # optimiser steps with a non-finite reward, one after another, that end a run


@dataclass
class TrainResult:
    """What a run produced."""

    lora_path: Path | None  # the LoRA written: the final name, or <name>-partial if stopped early
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of every optimiser step
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation records (TrainRun.evaluate)
    stopped_early: bool = False  # should_stop() or Ctrl-C ended the run before cfg.steps
    best_path: Path | None = None  # <name>-best.safetensors: the LoRA of the best evaluation, if kept
    best_step: int | None = None  # the step of the best evaluation by cfg.best_by
    early_stopped: bool = False  # cfg.early_stop_evals ended the run; it finished under the final name


def _stop_if_nothing_trains(history: Sequence[dict[str, Any]], steps: int) -> None:
    """RuntimeError once the reward was NaN/Inf in SKIPPED_IN_A_ROW steps in a row (or in every step
    of a shorter run): each was skipped, so the run would go on, or finish, without training."""
    needed = min(SKIPPED_IN_A_ROW, steps)
    recent = list(history[-needed:])
    if len(recent) == needed and all(m.get("skipped") for m in recent):
        raise RuntimeError(
            f"the reward returned NaN/Inf in {needed} optimiser steps in a row (steps {recent[0]['step']} to "
            f"{recent[-1]['step']}), so none of them changed the LoRA; the run stops rather than go on "
            "without training. Check the reward on these images (score a batch with AlignProp Score Images "
            "or evaluate()), its arguments and weights, and with fp16 try bf16.")


def saved_step(path: Path) -> int | None:
    """The alignprop.step a LoRA file's metadata records; None if the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["alignprop.step"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply not the best LoRA of this run
        return None


def train(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
          eval_prompts: Sequence[str], sampler: SamplerConfig, lora: LoraConfig, cfg: TrainConfig,
          out_dir: str | Path | None = None, lora_name: str = "alignprop_lora.safetensors",
          resume_from: str | Path | None = None, on_step: OnStep | None = None,
          should_stop: Callable[[], bool] | None = None, init_lora: LoraFile | None = None,
          state_dir: str | Path | None = None, overwrite: bool = False,
          on_save: Callable[[Path], None] | None = None,
          judges: Sequence[Reward] | None = None, world: World | None = None) -> TrainResult:
    """Fine-tune LoRA weights on `backend.lora_target` to maximise `reward`.

    Args:
        backend: the model as callables (see `models.backend.DiffusionBackend`).
        reward: differentiable reward, images in [0,1] -> (B,): a `Reward` (its spec is recorded in
            the LoRA and the training state) or a plain function (recorded as `cfg.reward`).
        prompts / eval_prompts: training prompts and held-out prompts for evaluation.
        sampler, lora, cfg: the sampler, LoRA and training configs.
        out_dir: where the LoRA (and, with cfg.save_every, the training state) are written.
        lora_name: file name of the final LoRA inside out_dir (.safetensors is added if missing). A
            run that is stopped early or fails writes `<name>-partial.safetensors` instead, so it
            never replaces a finished LoRA of that name.
        resume_from: a train_state.pt to continue from exactly (same LoRA settings and reward spec).
        on_step: called after every optimiser step (and evaluation) with (step, metrics).
        should_stop: polled at step boundaries; True ends the run and still saves the LoRA.
        init_lora: a LoRA file to continue from (its rank, alpha and modules must match `lora`).
        state_dir: where train_state.pt goes (default: out_dir).
        on_save: called with the path of every LoRA file written (step saves, the best, the final or
            partial one).
        overwrite: replace an existing file at out_dir/lora_name (and, with cfg.keep_best, at
            out_dir/<name>-best.safetensors); without it that is refused (FileExistsError) before any
            work. A resumed run may always replace the -best file: it continues the run that wrote it.
        judges: rewards that score every evaluation beside `reward`, never trained on (default: built
            from cfg.judges).
        world: this rank of a data-parallel run (`parallel.world`; default one process). Every rank
            calls `train` alike; rank 0 alone checks and writes files (out_dir and state_dir are
            ignored elsewhere), should_stop on any rank stops all of them, and every rank gets the same
            evaluation records (`TrainRun.evaluate`), so they agree on the best and on early stopping.

    Returns:
        TrainResult with the LoRA path, the metric history, the best LoRA and whether it stopped early.
    """
    # 0. everything that can be refused is refused before the first sample
    check_run_inputs(backend, prompts, eval_prompts, cfg)
    state = load_train_state(resume_from) if resume_from is not None else None
    world = world or single_process()
    out = Path(out_dir) if out_dir is not None and world.writes else None
    state_out = (Path(state_dir) if state_dir is not None else out) if world.writes else None
    keep_best = cfg.keep_best and out is not None
    if out is not None:
        lora_name = lora_file_name(lora_name, "lora_name")
        claim(check_writable(out) / lora_name, overwrite, "the LoRA file")
        if keep_best and state is None:
            claim(out / best_lora_name(lora_name), overwrite, "the best LoRA file")
    if state_out is not None:
        check_writable(state_out, "the training-state folder")
    run = TrainRun(backend, reward, prompts, eval_prompts, sampler, lora, cfg, init_lora=init_lora,
                   state=state, source=resume_from or "the training state", judges=judges, world=world)
    best_by, patience = run.cfg.best_by, run.cfg.early_stop_evals
    best: dict[str, Any] = {"step": None, "path": None}

    def report(metrics: dict[str, Any]) -> None:
        if on_step is not None:
            on_step(run.steps_done, dict(metrics))

    def save_state() -> None:
        if state_out is not None:
            run.save_state(state_out / "train_state.pt")

    def save(name: str) -> Path | None:
        if out is None:
            return None
        path = run.save_lora(out / name)
        if on_save is not None:
            on_save(path)
        return path

    def evaluate() -> None:
        """Evaluate, and keep the LoRA if this evaluation is the best so far."""
        report(run.evaluate())
        if best_index(run.evals, best_by) == len(run.evals) - 1:
            best["step"] = run.steps_done
            if keep_best:
                best["path"] = save(best_lora_name(lora_name))

    def restore_best() -> None:
        """A resumed run's best so far, from its restored evaluations; the -best file is trusted only
        if it holds that step (else it is written now, if the LoRA is still the best one)."""
        where = best_index(run.evals, best_by)
        if where is None:
            return
        best["step"] = run.evals[where]["step"]
        if not keep_best:
            return
        path = out / best_lora_name(lora_name)
        if saved_step(path) == best["step"]:
            best["path"] = path
        elif best["step"] == run.steps_done:
            best["path"] = save(path.name)

    try:
        restore_best()
        if run.steps_done == 0 and not run.evals:  # a run stopped during its step-0 evaluation has it already
            evaluate()
        stopped = early = False
        try:
            while not run.done:
                if world.any_true(should_stop is not None and should_stop(), "whether to stop"):
                    stopped = True
                    break
                report(run.step())
                step = run.steps_done
                _stop_if_nothing_trains(run.history, run.cfg.steps)
                evaluated = (run.cfg.eval_every and step % run.cfg.eval_every == 0) or step == run.cfg.steps
                if evaluated:
                    evaluate()
                if run.cfg.save_every and step % run.cfg.save_every == 0:
                    save_state()
                    save(f"{Path(lora_name).stem}-step{step:05d}.safetensors")
                if evaluated and not run.done and stalled(run.evals, best_by, patience):
                    early = True
                    warnings.warn(f"early stop at step {step}: {best_by} has not improved on its best (step "
                                  f"{best['step']}) for {patience} evaluations; the LoRA of step {step} is saved "
                                  f"as {lora_name}" + (f", the best as {best_lora_name(lora_name)}."
                                                       if best["path"] is not None else "."))
                    break
        except KeyboardInterrupt:
            stopped = True
            warnings.warn(f"training interrupted at step {run.steps_done}; saving the LoRA trained so far as "
                          f"{partial_path(lora_name)}.")
        except BaseException as err:
            # keep what was trained (the LoRA only ever changes by a completed optimiser step) under the
            # partial name, then let the caller see the original error
            warnings.warn(f"training stopped by {type(err).__name__} at step {run.steps_done}; saving the LoRA "
                          f"trained so far as {partial_path(lora_name)}.")
            save(partial_path(lora_name).name)
            save_state()
            raise
    finally:
        run.close()  # the reward's networks back where the caller had them
    if stopped:
        save_state()
    path = save(partial_path(lora_name).name if stopped else lora_name)
    return TrainResult(lora_path=path, history=run.history, evals=run.evals, stopped_early=stopped,
                       best_path=best["path"], best_step=best["step"], early_stopped=early)
