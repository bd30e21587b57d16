"""The example workflows in ComfyUI's own web app, driven by a headless Chromium (marker `slow`).

test_workflows.py converts the UI files with our reading of the frontend's rules (`ui_to_api`); this
module asks the real frontend (comfyui-frontend-package, served by the test server) instead:

1. for each workflows/<name>.json, `app.loadGraphData(workflow)` then `app.graphToPrompt()` gives
   exactly the committed api/<name>.api.json (same node ids, class types, inputs and titles);
2. one small workflow (score_ksampler_batch, test-sized: the random SD1.5 checkpoint, 64 px, two
   sampler steps) is edited through the app's widgets and queued with `app.queuePrompt`, as the
   Queue button does; it runs to success and its history entry carries the browser's workflow.

Chromium comes from the system (Debian's `chromium` package; .ci/run installs it), driven with the
`playwright` package's `executable_path`, so no browser is ever downloaded. Without a chromium
binary the module is skipped, saying so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from test_workflows import AESTHETIC_HEAD, CLIP_VISION, TEST_VALUES, WORKFLOWS, load_workflow

pytestmark = pytest.mark.slow

QUEUED = "score_ksampler_batch"
PAGE_ERRORS: list[str] = []  # uncaught JavaScript errors of the page


def chromium_path() -> str | None:
    """The system Chromium: $ALIGNPROP_CHROMIUM, else chromium / chromium-browser on PATH."""
    for candidate in (os.environ.get("ALIGNPROP_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def reward_files_for_ui(server) -> None:
    """The two reward files score_ksampler_batch names, unless test_workflows already wrote them."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop_core.rewards.aesthetic import AestheticHead

    head = server.models_dir / "reward_models" / AESTHETIC_HEAD
    clip = server.models_dir / "clip_vision" / CLIP_VISION
    torch.manual_seed(3)
    if not head.is_file():
        torch.save(AestheticHead(768).state_dict(), head)
    if not clip.is_file():
        config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, projection_dim=768, num_hidden_layers=2,
                                  num_attention_heads=1, image_size=224, patch_size=32, hidden_act="gelu")
        model = CLIPVisionModelWithProjection(config).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip))


@pytest.fixture(scope="module")
def page(server, sd15_checkpoint, reward_files_for_ui):
    """ComfyUI's web app, loaded in headless Chromium once every model file is in place."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary (install Debian's chromium: apt-get install -y chromium, or set "
                    "ALIGNPROP_CHROMIUM); .ci/run installs it in CI")
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            tab = browser.new_page()
            tab.on("pageerror", lambda error: PAGE_ERRORS.append(str(error)))
            tab.goto(server.url, wait_until="domcontentloaded", timeout=180_000)
            tab.wait_for_function("() => window.app && window.app.graph && window.app.graph._nodes !== undefined",
                                  timeout=300_000)
            print(f"\n[browser] {executable}: ComfyUI app ready in {time.monotonic() - started:.1f} s")
            yield tab
        finally:
            browser.close()


GRAPH_TO_PROMPT = """async (workflow) => {
    await window.app.loadGraphData(workflow);
    return (await window.app.graphToPrompt()).output;
}"""


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_converts_each_ui_workflow_to_its_api_twin(page, name):
    ui, api = load_workflow(name)
    output = page.evaluate(GRAPH_TO_PROMPT, ui)
    assert sorted(output) == sorted(api), f"{name}: node ids {sorted(output)} vs twin {sorted(api)}"
    for node_id, node in api.items():
        got = output[node_id]
        assert got["class_type"] == node["class_type"], (name, node_id, got["class_type"])
        assert got["inputs"] == node["inputs"], (
            f"{name} node {node_id} ({node['class_type']}): the frontend sends {got['inputs']}, "
            f"the twin has {node['inputs']}")
        assert got.get("_meta", {}).get("title") == node["_meta"]["title"], (name, node_id)


QUEUE_EDITED = """async ({workflow, values}) => {
    await window.app.loadGraphData(workflow);
    for (const node of window.app.graph._nodes) {
        const wanted = values[node.type] || {};
        for (const widget of node.widgets || []) {
            if (widget.name in wanted) widget.value = wanted[widget.name];
        }
    }
    const prompt = (await window.app.graphToPrompt()).output;
    await window.app.queuePrompt(0, 1);
    return prompt;
}"""


def _history_entry_for(server, prompt: dict, earlier: set[str], timeout: float = 900.0) -> dict:
    """The finished history entry whose graph is `prompt` and whose id is not in `earlier` (the ids
    already in the history before the browser queued it): test_workflows.py queues the same graph
    through the API, and that entry (no workflow attached) must not be mistaken for the browser's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for prompt_id, entry in (server._request("/history") or {}).items():
            if prompt_id in earlier:
                continue
            if entry["prompt"][2] == prompt and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str"):
                    return entry
        time.sleep(1.0)
    raise TimeoutError(f"the prompt queued from the browser did not finish\n{server.log_tail()}")


def test_small_workflow_queued_from_the_ui_succeeds(page, server, sd15_checkpoint):
    ui, api = load_workflow(QUEUED)
    values = {kind: dict(v) for kind, v in TEST_VALUES.items()}
    values["CheckpointLoaderSimple"] = {"ckpt_name": sd15_checkpoint}
    earlier = set(server._request("/history") or {})
    started = time.monotonic()
    prompt = page.evaluate(QUEUE_EDITED, {"workflow": ui, "values": values})
    ckpt_nodes = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert ckpt_nodes and all(n["inputs"]["ckpt_name"] == sd15_checkpoint for n in ckpt_nodes), prompt
    entry = _history_entry_for(server, prompt, earlier)
    print(f"\n[browser] {QUEUED} queued from the UI: {entry['status']['status_str']} in "
          f"{time.monotonic() - started:.1f} s")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    extra = entry["prompt"][3]
    assert extra.get("client_id"), "the browser's websocket client id should be on the prompt"
    assert extra.get("extra_pnginfo", {}).get("workflow", {}).get("nodes"), "the UI sends its workflow along"
    score_id = next(i for i, n in api.items() if n["class_type"] == "AlignProp_ScoreImages")
    text = entry["outputs"][score_id]["text"][0]
    scores = [float(s) for s in re.findall(r"^\d+: (\S+)$", text, flags=re.M)]
    assert len(scores) == TEST_VALUES["EmptyLatentImage"]["batch_size"] and all(s == s for s in scores), text
    assert not [e for e in PAGE_ERRORS if "AlignProp" in e], PAGE_ERRORS
