"""One measurement in a fresh process: `python -m bench.worker '<JSON>'` prints one JSON line.

The JSON holds `RigSpec` fields plus `_repeats` (timed rounds), `_threads` and `_sample` (also time
no-grad sampling, interleaved with the training steps). The process builds the rig, runs one untimed
warm-up round (one-time allocations such as AdamW state belong to the baseline), trims the heap,
then times `_repeats` rounds while tracking peak RSS above the pre-round RSS, and finally counts the
bytes one training forward saves for backward. A fresh process per configuration keeps one
configuration's heap from colouring the next one's peak.
"""
from __future__ import annotations

import json
import sys

import torch

from alignprop_core.sampling.sampler import sample_images
from bench.rig import Rig, RigSpec, build_rig
from bench.rss import peak_rss_bytes, reset_peak, rss_bytes, trim_heap
from bench.saved import count_saved, weight_pointers
from bench.timing import time_call


def _model_modules(rig: Rig) -> list[torch.nn.Module]:
    """UNet, VAE and text encoder: found on the T2IModel the backend's decode closes over."""
    found = [rig.backend.lora_target]
    for cell in getattr(rig.backend.decode, "__closure__", None) or ():
        for name in ("vae", "text_encoder"):
            net = getattr(cell.cell_contents, name, None)
            if isinstance(net, torch.nn.Module):
                found.append(net)
    return found


def saved_for_backward(rig: Rig) -> dict:
    """Saved-tensor bytes of one training forward (sample with K grad steps, decode, reward)."""
    exclude = weight_pointers(_model_modules(rig))
    shape = rig.backend.latent_shape(rig.train.batch_size, rig.train.height, rig.train.width)
    x_T = torch.randn(shape, generator=rig.gen)
    prompts = [rig.prompts[i % len(rig.prompts)] for i in range(rig.train.batch_size)]
    with count_saved(exclude) as counter:
        images = sample_images(rig.backend, prompts, rig.sampler, x_T, rig.train.negative_prompt,
                               grad_steps=rig.sampler.k, generator=rig.gen)
        loss = -rig.reward_fn(images.float(), prompts).float().mean()
    loss.backward()  # outside the count: recomputation is not a saved tensor
    rig.optimizer.zero_grad(set_to_none=True)
    latent_bytes = x_T.numel() * x_T.element_size()
    return {"saved_bytes": counter.bytes, "saved_tensors": counter.tensors, "latent_bytes": latent_bytes}


def measure(spec: RigSpec, repeats: int, threads: int, sample: bool) -> dict:
    torch.set_num_threads(threads)
    rig = build_rig(spec)
    if sample:
        rig.sample()
    rig.train_step()
    trim_heap()
    base = rss_bytes()
    reset_ok = reset_peak()
    step_s, sample_s = [], []
    for _ in range(repeats):
        if sample:
            sample_s.append(time_call(rig.sample))
        step_s.append(time_call(rig.train_step))
    peak = peak_rss_bytes()
    out = {"step_s": step_s, "sample_s": sample_s, "rss_base": base, "rss_peak": peak,
           "rss_growth": peak - base, "peak_reset": reset_ok}
    out.update(saved_for_backward(rig))
    return out


def main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    repeats, threads, sample = raw.pop("_repeats", 2), raw.pop("_threads", 1), raw.pop("_sample", False)
    print(json.dumps(measure(RigSpec(**raw), repeats, threads, sample)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
