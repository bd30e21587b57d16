"""RESULTS.md from the measured results dict (every number in it is read from the measurements)."""
from __future__ import annotations

from pathlib import Path

from alignprop_core.config import LoraConfig
from bench.plots import efficiency_plot_name

MIB = 2 ** 20
ATTENTION_TARGETS = LoraConfig().target_modules  # what results without lora_targets were run with


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _size(b: float) -> str:
    """Bytes as MiB, or KiB below 0.1 MiB."""
    return f"{b / MIB:.1f} MiB" if b >= 0.1 * MIB else f"{b / 1024:.1f} KiB"


def machine_section(m: dict, load_end: tuple, quick: bool, minutes: float) -> list[str]:
    busy = max(m["load_start"][0], load_end[0]) > 0.5 * m["cores"]
    lines = ["## Machine", "",
             f"- CPU: {m['cpu']} ({m['cores']} cores), device `{m['device']}`, torch {m['torch']}, "
             f"Python {m['python']}, {m['threads']} torch thread(s) per measurement",
             f"- load average (1/5/15 min) at start {tuple(m['load_start'])}, at end {tuple(load_end)}"
             + (" — **other jobs were running on these cores**: absolute times are noisy; the ratios "
                "were measured in the same process, interleaved, and are the numbers to read." if busy else ""),
             f"- mode: {'quick' if quick else 'full'}; total bench time {minutes:.1f} min", ""]
    return lines


def overhead_section(rows: list[dict]) -> list[str]:
    out = ["## 1. Training overhead (one AlignProp step ÷ no-grad sampling of the same T steps)", "",
           "| model | px | T | K | batch | no-grad sample (s) | AlignProp step (s) | ratio | floor (T+3)/T | target ≤ 1.25 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['px']} | {r['T']} | {r['K']} | {r['batch']} | {r['sample_s']:.2f} | "
                   f"{r['step_s']:.2f} | **{r['ratio']:.3f}** | {r['floor']:.2f} | {_mark(r['met'])} |")
    out += ["", f"Medians of {rows[0]['repeats']} interleaved rounds; ratio = median of per-round ratios. "
            "The step is `alignprop_core.training.step.optimizer_step` (sample with the last K steps "
            "differentiable and checkpointed, checkpointed decode, reward, backward, clip, AdamW); "
            "the baseline is `alignprop_core.sampling.sampler.sample_images` under `no_grad`.", ""]
    return out


def memory_section(mem: dict, title: str = "## 2. Memory versus K") -> list[str]:
    out = [f"{title} ({mem['model']}, {mem['px']} px, T={mem['T']}, reward `{mem['reward']}`)", "",
           "| checkpointing | K | saved for backward | peak RSS growth (MiB) | step (s) |", "|---|---|---|---|---|"]
    for r in mem["rows"]:
        out.append(f"| {'yes' if r['checkpoint'] else 'no'} | {r['K']} | {_size(r['saved_bytes'])} | {r['rss_growth'] / MIB:.1f} | {r['step_s']:.2f} |")
    lat = mem["rows"][0]["latent_bytes"]
    out += ["", f"- checkpointed, saved-for-backward K={mem['k_hi']} ÷ K={mem['k_lo']}: "
            f"**{mem['saved_ratio']:.2f}×** (target ≤ 1.2×: {_mark(mem['saved_met'])}). Each extra "
            f"differentiable step saves exactly one latent ({_size(lat)}); "
            "the K=1 base is the decoder input, the first window latent and what the reward saves.",
            f"- checkpointed, peak RSS growth K={mem['k_hi']} ÷ K={mem['k_lo']}: **{mem['rss_ratio']:.2f}×** "
            f"(target ≤ 1.5×: {_mark(mem['rss_met'])}).",
            "- saved bytes are counted with `torch.autograd.graph.saved_tensors_hooks` over one training "
            "forward, once per storage, model weights excluded; peak RSS growth is VmHWM (reset via "
            "/proc/self/clear_refs after a warm-up step and `malloc_trim`) minus the RSS before the timed "
            "steps, each configuration in a fresh process.", ""]
    return out


def reference_section(ref: dict) -> list[str]:
    out = ["## 3. Against the reference implementations (same diffusers folder, prompts, reward, T=20, K=1, CFG 7.5)", ""]
    if not ref["trl_available"]:
        out += ["TRL venv `bench/.venv-trl` not found: only ours was measured (see bench/README.md).", ""]
    out += ["| model | px | impl | step (s) | peak RSS growth (MiB) | ours ÷ it: time | ours ÷ it: memory |",
            "|---|---|---|---|---|---|---|"]
    for r in ref["rows"]:
        for name, v in r["impls"].items():
            t = r.get(f"time_vs_{name}")
            m = r.get(f"mem_vs_{name}")
            out.append(f"| {r['model']} | {r['px']} | {name} | {v['step_s']:.2f} | {v['rss_growth'] / MIB:.1f} | "
                       f"{'' if t is None else f'**{t:.2f}** ({_mark(t <= 0.8)})'} | "
                       f"{'' if m is None else f'**{m:.2f}** ({_mark(m <= 0.9)})'} |")
    out += ["", "- `trl`: TRL 0.23.1 `AlignPropTrainer.step` on `DefaultDDPOStableDiffusionPipeline` "
            "(fixed truncation), in the separate venv. `official`: the official repository's "
            "`sd_pipeline.pipeline_step_with_grad` (imported from its file"
            + (f", `{ref['official_src']}`" if ref.get("official_src") else ", not given: skipped")
            + ") driven by *our transcription of the official trainer step*.",
            "- What limits the comparison: CPU only, fp32 (the references default to fp16 on GPU); the "
            "reward is weight-free, so the reward network's share of time and memory (large for "
            "aesthetic/HPS) is absent; each implementation runs in its own process one after the "
            "other, so background load can differ between them; peak RSS growth includes allocator "
            "behaviour of each process.", ""]
    return out


def alignprop_setting(spec: dict) -> str:
    """AlignProp's settings in item 4 that are chosen per reward: lr, K and reward augmentation."""
    k_min, k_max = spec.get("k_min", 1), spec.get("k_max", 1)
    k = f"{k_min}-{k_max}" if k_min != k_max else f"{k_min}"
    out = f"lr {spec['alignprop_lr']:g}, K {k}, reward augmentation {spec.get('alignprop_reward_augment', 'none')}"
    targets = tuple(spec.get("lora_targets", ATTENTION_TARGETS))
    return out if targets == ATTENTION_TARGETS else f"{out}, LoRA on {lora_scope(targets)}"


def lora_scope(targets) -> str:
    """The LoRA target modules in words (results before lora_targets was recorded: attention only)."""
    targets = tuple(targets)
    if targets == ATTENTION_TARGETS:
        return "the attention projections"
    return "`" + "`, `".join(targets) + "`"


def efficiency_section(eff: dict, title: str = "## 4. Sample efficiency against RL") -> list[str]:
    s = eff["spec"]
    ap, dd, runs = eff["alignprop"], eff["ddpo"], eff.get("alignprop_runs", [])
    dd_runs = eff.get("ddpo_runs", [dd])
    seeds = s.get("alignprop_seeds", [s["seed"]])
    dd_seeds = s.get("ddpo_seeds", [s["seed"]])
    out = [f"{title} ({s['model']}, reward `{s['reward']}`, T={s['steps']}, "
           f"CFG {s['guidance']})", "",
           "| method | reward queries | held-out reward | training-prompt reward |", "|---|---|---|---|"]

    def cell(c: dict, key: str, i: int, each_run: list) -> str:
        """c[key], with every seed's value at point i of `each_run` when there are several."""
        if key not in c:
            return "-"
        each = (" (seeds: " + ", ".join(f"{r[i][key]:.3f}" for r in each_run) + ")"
                if len(each_run) > 1 else "")
        return f"{c[key]:.4f}{each}"

    for i, c in enumerate(ap):
        out.append(f"| AlignProp, median of {len(seeds)} | {c['queries']} | {cell(c, 'reward', i, runs)} | "
                   f"{cell(c, 'train_reward', i, runs)} |")
    dd_name = f"DDPO, median of {len(dd_runs)}" if len(dd_runs) > 1 else "DDPO"
    out += [f"| {dd_name} | {c['queries']} | {cell(c, 'reward', i, dd_runs)} | "
            f"{cell(c, 'train_reward', i, dd_runs)} |" for i, c in enumerate(dd)]
    need = eff["alignprop_queries_needed"]
    reached = need if need is not None else f"> {ap[-1]['queries']}"
    per = eff.get("alignprop_queries_per_seed")
    best_need = eff.get("alignprop_queries_to_ddpo_best")
    out += ["", f"- DDPO's held-out reward at {dd[-1]['queries']} queries: {eff['ddpo_final']:.4f} "
            f"(start {dd[0]['reward']:.4f}{'' if eff['ddpo_improved'] else '; DDPO did not improve'}).",
            f"- AlignProp's median curve reaches it at **{reached} queries**"
            + (f", {eff['factor']:.1f}× fewer" if eff["factor"] else "")
            + f" (target ≥ {eff['target_factor']}× fewer: {_mark(eff['met'])})."
            + (f" Each seed alone: {', '.join(str(q) if q is not None else 'never' for q in per)}." if per else ""),
            ]
    sweep = eff.get("ddpo_sweep", [])
    if len(sweep) > 1 or len(dd_runs) > 1:
        def finals(r: dict) -> str:
            each = r.get("runs", [])
            return (" (seeds: " + ", ".join(f"{c[-1]['reward']:.3f}" for c in each) + ")") if len(each) > 1 else ""
        runs_per_lr = (f"{len(dd_seeds)} seeds ({', '.join(map(str, dd_seeds))}) for each learning rate, each lr "
                       "judged by their median" if len(dd_runs) > 1 else "once for each learning rate")
        out.append(f"- DDPO ran {runs_per_lr}; the strongest at {dd[-1]['queries']} queries is "
                   f"the baseline (lr {eff['ddpo_lr']:g}): "
                   + "; ".join(f"lr {r['lr']:g}: {r['curve'][-1]['reward']:.4f}{finals(r)} (best on the way "
                               f"{max(c['reward'] for c in r['curve']):.4f})" for r in sweep) + ".")
    if "ddpo_best" in eff:
        out.append(f"- DDPO's best evaluation on the way ({eff['ddpo_best']:.4f}) is reached by the median at "
                   + (f"{best_need} queries." if best_need is not None else f"none of the {ap[-1]['queries']} queries."))
    tp = eff.get("train_prompts")
    if tp:
        tneed, ap_best = tp["alignprop_queries_needed"], max(c["train_reward"] for c in ap)
        reach = ("DDPO did not improve on them" if not tp["ddpo_improved"] else
                 "AlignProp's median reaches DDPO's final at "
                 + (f"{tneed} queries ({tp['factor']:.1f}× fewer)" if tneed is not None else "none of its queries"))
        out.append(f"- Training-prompt column: the same runs scored on {s['train_eval_prompts']} training prompts, "
                   "one image each (noisier than the held-out column). DDPO goes from "
                   f"{dd[0]['train_reward']:.4f} to {tp['ddpo_final']:.4f} (best {tp['ddpo_best']:.4f}); AlignProp's "
                   f"median ends at {ap[-1]['train_reward']:.4f} (best {ap_best:.4f}); {reach}.")
    out += [f"- wall clock: AlignProp {ap[-1]['wall_s']:.0f} s for {ap[-1]['queries']} queries (median run), "
            f"DDPO {dd[-1]['wall_s']:.0f} s for {dd[-1]['queries']} (evaluations included"
            + (f"; {s['workers']} runs side by side" if s.get("workers", 1) > 1 else "") + ").",
            "- AlignProp is `alignprop_core.training.trainer.train` (batch "
            f"{s['alignprop_batch']}, {alignprop_setting(s)}, {s.get('alignprop_schedule', 'constant')} lr, "
            f"seeds {', '.join(map(str, seeds))}); DDPO is "
            "`bench/ddpo.py`, a DDPO_IS implementation following TRL 0.23's DDPOTrainer (eta 1, PPO clip "
            f"1e-4, advantage clip 5, lr {eff.get('ddpo_lr', s.get('ddpo_lr', 3e-4)):g}; TRL's default is 3e-4), "
            f"seed{'s' if len(dd_seeds) > 1 else ''} {', '.join(map(str, dd_seeds))}. "
            f"Both train a rank-{s.get('lora_rank', 4)} LoRA on "
            f"{lora_scope(s.get('lora_targets', ATTENTION_TARGETS))} and are evaluated by `trainer.evaluate` "
            f"(DDIM eta 0, fixed latents, {s.get('eval_prompts') or 'all'} held-out prompts, "
            f"{s.get('eval_latents', 1)} image(s) each).", ""]
    return out


def scaling_section(sc: dict) -> list[str]:
    out = ["## 5. Scaling (K=1, CFG, checkpointing)", "",
           "| model | px | T | batch | AlignProp step (s) | no-grad sample (s) | ratio | peak RSS growth (MiB) | saved for backward |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sc["by_resolution"] + sc["by_steps"] + sc["sd15"]:
        sample = "" if r["sample_s"] is None else f"{r['sample_s']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        out.append(f"| {r['model']} | {r['px']} | {r['T']} | {r['batch']} | {r['step_s']:.2f} | {sample} | {ratio} | "
                   f"{r['rss_growth'] / MIB:.1f} | {_size(r['saved_bytes'])} |")
    if sc["sd15"]:
        out += ["", "`sd15` rows: the full SD1.5 architecture (UNet 860M, CLIP ViT-L/14 text encoder, VAE f=8) "
                "with random weights, built from its standard config; single measurement after a warm-up. "
                "Time per extra sampling step ≈ (sample time) / T."]
    out.append("")
    return out


def estimators_section(est: dict) -> list[str]:
    spec, med, goal = est["spec"], est["median"], est["goal"]
    out = [f"### `{spec['reward']}` ({Path(spec['model']).name}, T={spec['steps']}, batch {spec['batch']}, "
           f"lr {spec['lr']:g}, LoRA rank {spec['lora_rank']}, median of {len(spec['seeds'])} seeds)", "",
           "| estimator | optimiser steps | reward queries | training s | held-out reward: start | at the end |",
           "|---|---|---|---|---|---|"]
    for name, label in (("truncated", "truncated, K=1"), ("draft_lv", f"DRaFT-LV, n={spec['lv_samples']}")):
        curve = med[name]
        steps = int(curve[-1]["queries"]) // (spec["batch"] * (spec["lv_samples"] + 1 if name == "draft_lv" else 1))
        out.append(f"| {label} | {steps} | {curve[-1]['queries']:.0f} | {curve[-1]['train_s']:.0f} | "
                   f"{curve[0]['reward']:.4f} | {curve[-1]['reward']:.4f} |")
    hit = est["draft_lv_reach"]
    reach = ("Truncated K=1 ended at or below the untrained start, so there is nothing to reach: no "
             "verdict; compare the end columns" if not est.get("truncated_improved", True) else
             "DRaFT-LV's median never reached it" if hit is None else
             f"DRaFT-LV's median reaches it after {hit['queries']:.0f} queries and {hit['train_s']:.0f} s "
             f"of training: **{est['wall_fraction']:.2f}×** truncated K=1's time")
    out += ["", f"Goal: truncated K=1's median held-out reward at {goal['queries']:.0f} queries, "
            f"{goal['reward']:.4f}, after {goal['train_s']:.0f} s of training. {reach} "
            f"(target ≤ {est['target']}×: {_mark(est['met'])}).", ""]
    return out


def _dp_job(spec: dict) -> str:
    return f"{Path(spec['model']).name}, `{spec['reward']}`, batch {spec['batch']} per rank, T={spec['steps']}, K={spec['k']}"


def data_parallel_section(dp: dict) -> list[str]:
    lines = ["## 7. Data parallel: 2 gloo ranks against 1 process", "",
             f"{_dp_job(dp['spec'])}; one torch thread per process, one core per rank. Each round starts "
             f"fresh processes and times {dp['repeats']} steps after a warm-up step; the ratio is the median "
             "over rounds of (2-rank median step) / (1-process median step). 1.0 is perfect scaling of the "
             "global batch.", "", "| round | 1 process (s) | 2 ranks (s) | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | {r['one_s']:.3f} | {r['two_s']:.3f} | {r['ratio']:.2f} |" for i, r in enumerate(dp["rounds"])]
    return lines + ["", f"Median ratio: **{dp['ratio']:.2f}**.", ""]


def render(results: dict) -> str:
    lines = ["# AlignProp benchmarks", "",
             "Generated by `python -m bench run` (`bench/`); every number below is measured in this run.", ""]
    lines += machine_section(results["machine"], results["load_end"], results["quick"], results["minutes"])
    if results.get("notes"):  # items re-run on their own and merged into this results.json by hand
        lines[-1:-1] = [f"- note: {note}" for note in results["notes"]]
    if "overhead" in results:
        lines += overhead_section(results["overhead"])
    if "memory" in results:
        lines += memory_section(results["memory"])
        lines += ["![memory vs K](memory_vs_k.png)", ""]
    if "memory_worst_case" in results:
        lines += memory_section(results["memory_worst_case"], "### 2b. Worst case: a weight-free reward")
        lines += ["With nothing but latents and a tiny decoder to save, the fixed one-latent-per-step "
                  "cost of checkpointing is a large share of the total, so this ratio is the upper bound "
                  "of what checkpointing costs in K; any reward network (the row above) dilutes it.", "",
                  "![memory vs K, weight-free reward](memory_vs_k_worst_case.png)", ""]
    for mem in results.get("memory_flow", []):
        lines += memory_section(mem, "### 2c. A rectified-flow model")
    if "reference" in results:
        lines += reference_section(results["reference"])
    if "efficiency" in results:
        lines += efficiency_section(results["efficiency"])
        lines += ["![sample efficiency](sample_efficiency.png)", ""]
    for eff in results.get("efficiency_more", []):
        reward = eff["spec"]["reward"]
        lines += efficiency_section(eff, f"### 4b. Again with `{reward}`, AlignProp {alignprop_setting(eff['spec'])}")
        lines += [f"![sample efficiency, {reward}]({efficiency_plot_name(reward)})", ""]
    if "scaling" in results:
        lines += scaling_section(results["scaling"])
        lines += ["![scaling](scaling.png)", ""]
    if results.get("estimators"):
        lines += ["## 6. Gradient estimators: DRaFT-LV against truncated K=1", "",
                  "Same model, prompts, T, guidance, LoRA, batch and learning rate; only "
                  "`SamplerConfig.estimator` differs. Each seed runs both, one after the other in one "
                  "process; training seconds count the optimiser steps only. Medians over seeds, point "
                  "by point; the held-out reward is the mean over every held-out prompt, one image each.", ""]
        for est in results["estimators"]:
            lines += estimators_section(est)
    if "data_parallel" in results:
        lines += data_parallel_section(results["data_parallel"])
    return "\n".join(lines)


README_START = "<!-- bench-summary:start (written by `python -m bench run/render --readme README.md`) -->"
README_END = "<!-- bench-summary:end -->"


def summary_table(results: dict) -> list[str]:
    """The README's one-table summary of a results dict: one row per target, measured vs target."""
    rows = ["| what | measured | target | |", "| --- | --- | --- | --- |"]
    if "overhead" in results:
        o = results["overhead"]
        rows.append("| one AlignProp step (T=20, K=1, CFG) / no-grad sampling of the same steps | "
                    + ", ".join(f"{r['model']} ({r['px']} px) {r['ratio']:.3f}" for r in o)
                    + f" | <= 1.25 | {_mark(all(r['met'] for r in o))} |")
    memories = [(results[key], label) for key, label in
                (("memory", ""), ("memory_worst_case", "; worst case: weight-free reward")) if key in results]
    memories += [(m, "") for m in results.get("memory_flow", [])]
    for m, label in memories:
        lo = next(r for r in m["rows"] if r["checkpoint"] and r["K"] == m["k_lo"])
        hi = next(r for r in m["rows"] if r["checkpoint"] and r["K"] == m["k_hi"])
        where = f"{Path(m['model']).name}, `{m['reward']}`{label}"
        rows.append(f"| saved for backward, checkpointed, K={m['k_hi']} / K={m['k_lo']} ({where}) | "
                    f"{m['saved_ratio']:.2f} ({_size(lo['saved_bytes'])} -> {_size(hi['saved_bytes'])}) | "
                    f"<= 1.2 | {_mark(m['saved_met'])} |")
        rows.append(f"| peak RSS growth, checkpointed, K={m['k_hi']} / K={m['k_lo']} ({where}) | "
                    f"{m['rss_ratio']:.2f} ({lo['rss_growth'] / MIB:.1f} -> {hi['rss_growth'] / MIB:.1f} MiB) | "
                    f"<= 1.5 | {_mark(m['rss_met'])} |")
    if "reference" in results:
        for kind, target, what in (("time", 0.8, "step time"), ("mem", 0.9, "peak RSS growth")):
            cells = [(r["model"], name, r[f"{kind}_vs_{name}"]) for r in results["reference"]["rows"]
                     for name in r["impls"] if r.get(f"{kind}_vs_{name}") is not None]
            if cells:
                rows.append(f"| {what}, ours / reference (T=20, K=1) | "
                            + ", ".join(f"{model} vs {name} {v:.2f}" for model, name, v in cells)
                            + f" | <= {target} | {_mark(all(v <= target for *_, v in cells))} |")
    for e in ([results["efficiency"]] if "efficiency" in results else []) + results.get("efficiency_more", []):
        need = e["alignprop_queries_needed"]
        got = (f"> {e['alignprop'][-1]['queries']}" if need is None else
               f"{need} ({e['factor']:.1f}x fewer)" if e["factor"] else f"{need}")
        if "alignprop_runs" in e:
            got += f", median of {len(e['alignprop_runs'])} seeds"
        rows.append(f"| reward queries for AlignProp to reach DDPO's held-out reward at {e['ddpo'][-1]['queries']} "
                    f"queries ({Path(e['spec']['model']).name}, `{e['spec']['reward']}`; "
                    f"AlignProp {alignprop_setting(e['spec'])}) | {got}"
                    + ("" if e["ddpo_improved"] else "; DDPO did not improve")
                    + f" | <= 1/{e['target_factor']} | {_mark(e['met'])} |")
    for est in results.get("estimators", []):
        spec = est["spec"]
        got = ("no verdict: truncated K=1 ended below its start "
               f"({est['median']['truncated'][0]['reward']:.3f} -> {est['goal']['reward']:.3f}; DRaFT-LV "
               f"{est['median']['draft_lv'][-1]['reward']:.3f})" if not est.get("truncated_improved", True) else
               "not reached" if est["wall_fraction"] is None else
               f"{est['wall_fraction']:.2f}x ({est['draft_lv_reach']['train_s']:.0f} s vs "
               f"{est['goal']['train_s']:.0f} s)")
        rows.append(f"| DRaFT-LV (n={spec['lv_samples']}) training time to truncated K=1's held-out reward at "
                    f"{est['goal']['queries']:.0f} queries ({Path(spec['model']).name}, `{spec['reward']}`, "
                    f"median of {len(spec['seeds'])} seeds) | {got} | <= {est['target']}x | {_mark(est['met'])} |")
    if "data_parallel" in results:
        dp = results["data_parallel"]
        rows.append(f"| step time, 2 gloo ranks / 1 process, same per-rank batch ({_dp_job(dp['spec'])}) | "
                    f"{dp['ratio']:.2f} ({dp['one_s']:.2f} s -> {dp['two_s']:.2f} s, global batch x2) | "
                    "measured | |")
    if "scaling" in results and results["scaling"]["sd15"]:
        rows.append("| full SD1.5 architecture (random weights), one AlignProp step, T="
                    f"{results['scaling']['sd15'][0]['T']} | "
                    + ", ".join(f"{r['px']} px {r['step_s']:.1f} s" for r in results["scaling"]["sd15"])
                    + " | measured | |")
    return rows


def write_readme_summary(readme: Path, results: dict) -> None:
    """Replace the text between README_START and README_END in `readme` with `summary_table`."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no bench summary markers; put the two lines\n{README_START}\n"
                         f"{README_END}\nwhere the table belongs.")
    table = "\n".join(summary_table(results))
    readme.write_text(text[:start] + README_START + "\n" + table + "\n" + text[end:], encoding="utf-8")
