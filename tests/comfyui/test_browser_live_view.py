"""The trainer's live view in ComfyUI's web app, driven by a headless Chromium (marker `slow`).

A training graph (test_trainer_server.trainer_graph: random SD1.5 checkpoint, 64 px, smoothness
reward) is loaded through the app and queued as the Queue button does. While it runs, the view on
the AlignProp Trainer node must have received points and drawn them (the plot canvas holds pixels
of the smoothed-reward colour); after a page reload mid-run it must show the run again (fetched from
GET /alignprop/live) and keep receiving; after the run it keeps the final curve, the held-out points
and the LoRA path. No uncaught error or console error may come from the extension.
"""
from __future__ import annotations

import time

import pytest

from test_browser_workflows import chromium_path
from test_trainer_server import trainer_graph

pytestmark = pytest.mark.slow

STEPS = 12
TRAINER = "4"  # the trainer's node id in trainer_graph

APP_READY = "() => window.app && window.app.graph && window.app.graph._nodes !== undefined"
VIEW = f"""() => {{
    const node = window.app.graph.getNodeById({TRAINER});
    const root = node && node.widgets && node.widgets.find(w => w.name === "alignprop_live")?.element;
    if (!root) return null;
    const canvas = root.querySelector("canvas");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let line = 0;  // pixels of the smoothed-reward line, rgb(90,160,255)
    for (let i = 0; i < data.length; i += 4)
        if (Math.abs(data[i] - 90) < 20 && Math.abs(data[i + 1] - 160) < 20 && data[i + 2] > 225 && data[i + 3] > 200)
            line++;
    return {{points: +(root.dataset.points || 0), evals: +(root.dataset.evals || 0), status: root.dataset.status,
             drawn: +(root.dataset.drawn || 0), line, text: root.innerText,
             preview: root.querySelector("img").naturalWidth}};
}}"""


def _wait_view(tab, condition: str, timeout: float = 600.0) -> dict:
    tab.wait_for_function(f"() => {{ const v = ({VIEW})(); return v && ({condition}); }}", timeout=timeout * 1000,
                          polling=250)
    return tab.evaluate(VIEW)


def test_the_trainer_node_draws_the_run_live_and_again_after_a_reload(server, sd15_checkpoint):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary (install Debian's chromium, or set ALIGNPROP_CHROMIUM); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    graph = trainer_graph(sd15_checkpoint, "alignprop_test/live_view", steps=STEPS, eval_every=4, save_every=6)
    graph[TRAINER]["inputs"]["preview_every"] = 3
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            tab = browser.new_page(viewport={"width": 1600, "height": 1000})
            tab.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
            tab.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            tab.goto(server.url, wait_until="domcontentloaded", timeout=180_000)
            tab.wait_for_function(APP_READY, timeout=300_000)
            extensions = server._request("/extensions")
            assert any(e.endswith("/alignprop_live.js") for e in extensions), extensions

            started = time.monotonic()
            tab.evaluate("""async (graph) => {
                await window.app.loadApiJson(graph, "alignprop_live_view_test");
                await window.app.queuePrompt(0, 1);
            }""", graph)
            before = _wait_view(tab, 'v.points >= 2 && v.status === "running" && v.line > 10')
            print(f"\n[browser] live view: {before['points']} points drawn after {time.monotonic() - started:.1f} s")
            assert before["drawn"] >= before["points"] >= 2 and before["evals"] >= 1, before  # step-0 held-out
            assert f"/{STEPS}" in before["text"] and "ETA" in before["text"], before["text"]

            tab.reload(wait_until="domcontentloaded", timeout=180_000)
            tab.wait_for_function(APP_READY, timeout=300_000)
            after = _wait_view(tab, f'v.points >= {before["points"]} && v.line > 10', timeout=120)
            print(f"[browser] after the reload: {after['points']} points, status {after['status']}")
            assert after["status"] == "running", "the run ended before the reload test could see it running"
            more = _wait_view(tab, f'v.points > {after["points"]}')  # and messages keep arriving
            assert more["line"] > 10, more

            final = _wait_view(tab, 'v.status === "finished"', timeout=900)
            print(f"[browser] finished in {time.monotonic() - started:.1f} s: {final['points']} points, "
                  f"{final['evals']} held-out")
            assert final["points"] == STEPS and final["evals"] == 1 + STEPS // 4, final
            assert final["line"] > 10 and final["preview"] > 0, final
            assert "LoRA: " in final["text"] and "live_view.safetensors" in final["text"], final["text"]
            state = server._request("/alignprop/live")
            (run,) = [r for r in state["runs"] if r["node"] == TRAINER and r["status"] == "finished"][-1:]
            assert len(run["points"]) == STEPS and run["lora_path"].endswith("live_view.safetensors")
            shot = server.output_dir.parent / "live_view.png"
            tab.screenshot(path=str(shot))
            print(f"[browser] screenshot {shot}")
        finally:
            browser.close()
    # the frontend's own look-up of pack nodes on api.comfy.org is blocked offline: not the extension's
    ours = [e for e in errors if "alignprop" in e.lower() and "api.comfy.org" not in e]
    assert not ours, ours
