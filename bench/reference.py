"""Item 3, against the reference implementations: step time and peak RSS growth of one AlignProp
step in ours, TRL 0.23's `AlignPropTrainer` and the official AlignProp code (its sampler, our
transcription of its trainer step), on the same local random-weight diffusers folder, prompts,
reward, T, K, guidance, batch and LoRA; each in its own fresh process, the references in the
separate trl venv (`bench/.venv-trl`). Targets: ours <= 0.8x their time and <= 0.9x their memory.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from bench.models import model_folder
from bench.rig import RigSpec
from bench.subproc import ROOT, run_worker
from bench.timing import median

TRL_PYTHON = ROOT / "bench" / ".venv-trl" / "bin" / "python"


def official_source(repo: str | None, cache: Path) -> Path | None:
    """The official repository's sd_pipeline.py: a file, a checkout folder, or a bare git dir."""
    if not repo:
        return None
    path = Path(repo).expanduser()
    if path.is_file():
        return path
    if (path / "sd_pipeline.py").is_file():
        return path / "sd_pipeline.py"
    out = cache / "official" / "sd_pipeline.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = subprocess.run(["git", f"--git-dir={path}", "show", "HEAD:sd_pipeline.py"],
                          capture_output=True, text=True, check=True).stdout
    out.write_text(text, encoding="utf-8")
    return out


def run(models: list[str], reward: str, repeats: int, threads: int, cache: Path,
        official_repo: str | None, steps: int = 20) -> dict:
    src = official_source(official_repo, cache)
    have_trl = TRL_PYTHON.is_file()
    rows = []
    for model in models:
        folder = model_folder(model, cache)
        spec = RigSpec(model=str(folder), reward=reward, steps=steps, k=1, px=RigSpec(model=model).size)
        common = {"folder": str(folder), "reward": reward, "steps": steps, "k": 1,
                  "guidance": spec.guidance, "batch": spec.batch, "lr": spec.lr, "seed": spec.seed,
                  "repeats": repeats, "threads": threads}
        ours = run_worker("bench.worker", {**spec.__dict__, "_repeats": repeats, "_threads": threads})
        impls = {"ours": ours}
        with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
            if have_trl:
                impls["trl"] = run_worker("bench.reference_worker", {**common, "mode": "trl", "tmp": tmp},
                                          python=str(TRL_PYTHON))
            if have_trl and src is not None:
                impls["official"] = run_worker("bench.reference_worker",
                                               {**common, "mode": "official", "official_src": str(src)},
                                               python=str(TRL_PYTHON))
        row = {"model": model, "px": spec.size, "T": steps, "K": 1, "batch": spec.batch,
               "impls": {name: {"step_s": median(r["step_s"]), "rss_growth": r["rss_growth"],
                                "raw_step_s": r["step_s"]} for name, r in impls.items()}}
        for ref in ("trl", "official"):
            if ref in impls:
                row[f"time_vs_{ref}"] = row["impls"]["ours"]["step_s"] / row["impls"][ref]["step_s"]
                row[f"mem_vs_{ref}"] = ours["rss_growth"] / impls[ref]["rss_growth"]
        rows.append(row)
        print(f"[reference] {model}: " + ", ".join(f"{n} {v['step_s']:.2f}s {v['rss_growth']/2**20:.0f}MiB"
                                                    for n, v in row["impls"].items()), flush=True)
    return {"rows": rows, "trl_available": have_trl, "official_src": str(src) if src else None}
