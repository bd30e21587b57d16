"""The bench's rectified-flow rows: the builtin tiny SD3/FLUX.1 models build as flow backends and a
rig trains on them, and their memory results reach RESULTS.md and the README summary."""
from __future__ import annotations

import pytest
import torch

from bench import models
from bench.rig import RigSpec, build_rig
from alignprop_core.sampling.flow_schedule import FlowSchedule


@pytest.mark.parametrize("name, arch", [("tiny-sd3", "sd3"), ("tiny-flux", "flux")])
def test_builtin_flow_models_build_flow_backends_and_a_rig_trains_on_them(tmp_path, monkeypatch, name, arch):
    monkeypatch.setattr(models, "FOLDER_CACHE", tmp_path)
    rig = build_rig(RigSpec(model=name, steps=2, k=1, batch=1))
    assert rig.backend.arch == arch and isinstance(rig.backend.schedule, FlowSchedule)
    before = [p.detach().clone() for p in rig.params]
    metrics = rig.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, rig.params))  # AdamW moved the LoRA
    assert rig.sample().shape == (1, 3, 32, 32)


def test_flow_memory_results_are_rendered_and_summarised():
    from bench.report import memory_section, summary_table

    rows = [{"checkpoint": c, "K": k, "saved_bytes": 1000.0 * k if not c else 1000.0 + k,
             "latent_bytes": 1.0, "rss_growth": 2.0 ** 20, "step_s": 0.1}
            for c in (True, False) for k in (1, 20)]
    mem = {"model": "tiny-flux", "reward": "toy_count", "px": 32, "T": 20, "rows": rows, "k_lo": 1,
           "k_hi": 20, "saved_ratio": 1020 / 1001, "rss_ratio": 1.0, "saved_met": True, "rss_met": True}
    assert "### 2c. A rectified-flow model (tiny-flux, 32 px" in "\n".join(memory_section(mem, "### 2c. A rectified-flow model"))
    table = [r for r in summary_table({"memory_flow": [mem]}) if "tiny-flux" in r]
    assert len(table) == 2 and "1.02" in table[0]
