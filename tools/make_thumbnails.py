"""Dev tool: the template-browser thumbnail of every example workflow, taken after a real run.

ComfyUI's template browser lists each ``workflows/<name>.json`` of a node pack under the pack's
folder name and shows ``workflows/<name>.jpg`` as its picture (the frontend asks for
``/api/workflow_templates/<pack>/<name>.jpg``; no other name or format). This tool makes those
JPEGs: it starts the test ComfyUI server (tests/comfyui/harness.py: CPU only, 127.0.0.1 only, a
temporary base directory with this repository linked in as the pack), installs the tests' tiny
random models (SD1.5 and SD3 checkpoints, FLUX.1 files, an aesthetic head and a CLIP vision tower)
and, for each workflow in the order of tests/comfyui/test_workflows.py (the training workflows
first: the LoRA workflows load the LoRAs they write):

1. loads the committed workflow into ComfyUI's web app in the system Chromium (empty stand-ins for
   the model files it names, as tools/workflow_screenshot.py does, so the dropdowns show them);
2. queues the test-sized run of the same graph (test_workflows.shrink_for_test: the random models,
   two steps, 64 px training; the final samples at SAMPLE_PX) on behalf of that page, so the app
   receives the run's outputs and shows them on their nodes (Save Image, Preview Image) as after
   pressing Run;
3. gives those nodes room for their images, fits the whole graph into a 4:3 viewport, takes a
   screenshot and scales it to THUMB_WIDTH pixels, saved as a JPEG of at most MAX_BYTES.

The widgets show the committed values (the real model names, 512 px, 50 steps) while the pictures
on the output nodes come from the random test models, so the samples are noise and the reward
curve has two steps. Run it after changing a workflow (seconds to minutes per workflow on a CPU;
the FLUX one takes longest)::

    .venv/bin/python tools/make_thumbnails.py              # every workflow
    .venv/bin/python tools/make_thumbnails.py mix_two_loras --cache-dir /tmp/models

A workflow named alone still runs the workflows it depends on (the training workflows for the
LoRA workflows) first, without writing their thumbnails.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent / "tests" / "comfyui"))
sys.path.insert(0, str(TOOLS))
import harness  # noqa: E402
import test_workflows as runs  # noqa: E402
import workflow_screenshot as shots  # noqa: E402

THUMB_WIDTH = 512  # pixels; the browser shows a thumbnail in a card at most 256 px high
MAX_BYTES = 80_000  # every thumbnail is committed; the JPEG quality drops until it fits
VIEWPORT = (1600, 1200)  # 4:3, so every thumbnail has one shape whatever the graph's
CHECKPOINT_OF = {"train_sd35_lora": "sd3", "train_flux_lora": None}  # the others load SD1.5
NEEDS = {"use_trained_lora": runs.TRAINING, "mix_two_loras": runs.TRAINING}  # LoRAs they load
# The app draws an output image no larger than it is, and the tests' 64 px samples would be specks
# in a thumbnail; the final samples are drawn larger (training stays at the tests' size).
SAMPLE_PX = 256
SAMPLE_SIZE = {kind: {"width": SAMPLE_PX, "height": SAMPLE_PX}
               for kind in ("EmptyLatentImage", "EmptySD3LatentImage", "AlignProp_PreviewSampler")}

# Every node that saves or previews images has them loaded. The app loads a node's images when it
# draws the node, and draws only what is in view and only when asked to, so each poll asks.
OUTPUT_IMAGES_SHOWN = """(ids) => {
    window.app.graph.setDirtyCanvas(true, true);
    return ids.every(id => {
        const node = window.app.graph.getNodeById(Number(id));
        return node && node.imgs && node.imgs.length > 0 && node.imgs.every(i => i.complete && i.naturalWidth > 0);
    });
}"""

# The run's outputs handed to the app again, as the server's "executed" messages did. The app gives
# up on an image that does not load within about 16 s, which happens while the server is still busy
# with the rest of a slow run (FLUX); once the run is over the server answers at once.
REPLAY_OUTPUTS = """(outputs) => {
    for (const [node, output] of Object.entries(outputs)) {
        window.app.api.dispatchCustomEvent("executed", {node, display_node: node, output});
    }
}"""

# What each output node shows, when the wait above fails.
IMAGES_STATE = """(ids) => ids.map(id => {
    const node = window.app.graph.getNodeById(Number(id));
    return {id, found: !!node, images: (node && node.imgs || []).map(i => [i.src, i.complete, i.naturalWidth])};
})"""

# Give each node showing images room for them (at least MIN canvas units square), push every node
# it now covers further down its column, and fit the whole graph, centred, into the viewport.
MAKE_ROOM_AND_FIT = """async ({min, gap, margin}) => {
    const graph = window.app.graph, canvas = window.app.canvas, ds = canvas.ds;
    // from position and size: a node's boundingRect is only brought up to date when it is drawn
    const title = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
    const rect = (node) => [node.pos[0], node.pos[1] - title, node.size[0], node.size[1] + title];
    for (const node of graph._nodes) {
        if (node.imgs && node.imgs.length) node.setSize([Math.max(node.size[0], min), Math.max(node.size[1], min)]);
    }
    const nodes = [...graph._nodes].sort((a, b) => a.pos[1] - b.pos[1]);
    for (let i = 0; i < nodes.length; i++) {
        for (let j = 0; j < i; j++) {
            const [ax, ay, aw, ah] = rect(nodes[j]), [bx, by, bw] = rect(nodes[i]);
            if (bx < ax + aw && bx + bw > ax && by >= ay && by < ay + ah + gap) nodes[i].pos[1] += ay + ah + gap - by;
        }
    }
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const node of graph._nodes) {
        const [x, y, w, h] = rect(node);
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    const width = window.innerWidth, height = window.innerHeight;
    ds.scale = Math.min((width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
    ds.offset[0] = (width / ds.scale - (x1 - x0)) / 2 - x0;
    ds.offset[1] = (height / ds.scale - (y1 - y0)) / 2 - y0;
    canvas.setDirty(true, true);
    await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    return ds.scale;
}"""


def install_models(server: harness.Server, comfy_dir: Path, cache_dir: Path) -> dict[str | None, str]:
    """The tests' random models in the server's model folders; the checkpoint name per kind."""
    names = {}
    for kind in ("sd15", "sd3"):
        source = harness.cached_random_checkpoint(kind, cache_dir, comfy_dir=comfy_dir)
        names[kind] = f"alignprop_random_{kind}.ckpt"
        shutil.copyfile(source, server.models_dir / "checkpoints" / names[kind])
    harness.install_random_flux(server.base_dir, comfy_dir=comfy_dir, cache_dir=cache_dir)
    runs.write_reward_files(server.models_dir)
    return names


def test_sized(name: str, checkpoints: dict, object_info: dict) -> tuple[dict, dict]:
    """The committed UI workflow `name` and its test-sized API graph, pointed at the random models."""
    ui, _ = runs.load_workflow(name)
    kind = CHECKPOINT_OF.get(name, "sd15")
    values = dict(SAMPLE_SIZE)
    if kind is None:
        values.update(runs.flux_loader_values({"unet_name": harness.FLUX_FILES["diffusion_models"],
                                               "clip_l": harness.FLUX_FILES["text_encoders"][0],
                                               "t5xxl": harness.FLUX_FILES["text_encoders"][1],
                                               "vae_name": harness.FLUX_FILES["vae"]}))
    values = {t: v for t, v in values.items() if t in {n["type"] for n in ui["nodes"]}}
    return ui, runs.shrink_for_test(runs.ui_to_api(ui, object_info), checkpoints.get(kind), values)


def thumbnail_jpeg(png: bytes, width: int = THUMB_WIDTH, max_bytes: int = MAX_BYTES) -> bytes:
    """The screenshot scaled to `width` pixels, as the best-quality JPEG of at most max_bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    height = round(image.height * width / image.width)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    for quality in range(90, 30, -5):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    raise RuntimeError(f"no JPEG quality fits {width}x{height} pixels into {max_bytes} bytes")


def shoot(page, server: harness.Server, ui: dict, graph: dict, timeout: float) -> bytes:
    """Load ui into the app, run graph for it, wait for its output images; the screenshot of the graph."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    width, height = VIEWPORT
    shots.open_app(page, server)
    missing = page.evaluate(shots.LOAD_AND_FIND_MISSING, ui)
    placed, skipped = shots.place_dummy_models(missing, server.models_dir)
    for warning in skipped:
        print(f"[thumbnails] left as it is: {warning}", file=sys.stderr)
    if placed:  # the dropdown lists are read when the app starts
        shots.open_app(page, server)
        page.evaluate(shots.LOAD_AND_FIND_MISSING, ui)
    client_id = page.evaluate("() => window.app.api.clientId")
    entry = server.wait(server.queue(graph, client_id=client_id), timeout=timeout)
    if entry["status"].get("status_str") != "success":
        raise RuntimeError(f"the run did not succeed: {json.dumps(entry['status'])[-3000:]}")
    shown = [node_id for node_id, out in entry["outputs"].items() if out.get("images")]
    shots.graph_clip(page, width, height)  # chrome hidden, every node in view, so its images load
    page.evaluate(REPLAY_OUTPUTS, {node_id: entry["outputs"][node_id] for node_id in shown})
    try:
        page.wait_for_function(OUTPUT_IMAGES_SHOWN, arg=shown, timeout=60_000)
    except PlaywrightTimeout:
        state = page.evaluate(IMAGES_STATE, shown)
        raise RuntimeError(f"the app does not show the run's images: {state}") from None
    page.evaluate(MAKE_ROOM_AND_FIT, {"min": 400, "gap": 40, "margin": shots.MARGIN_PX})
    return page.screenshot()


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: server stopped, temp dir removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows to redo (default: all of {', '.join(runs.WORKFLOWS)})")
    parser.add_argument("--out-dir", type=Path, default=runs.WORKFLOWS_DIR,
                        help="where <name>.jpg goes (default: workflows/, beside the workflow)")
    parser.add_argument("--cache-dir", type=Path, default=harness.REPO_ROOT / ".cache" / "comfyui" / "checkpoints",
                        help="where the random models are built once and reused (default: the tests' cache)")
    parser.add_argument("--comfy-dir", type=Path, default=harness.DEFAULT_COMFY_DIR,
                        help="the ComfyUI directory holding main.py (default: the tests' .cache copy)")
    parser.add_argument("--chromium", help="Chromium binary (default: $ALIGNPROP_CHROMIUM, else chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.names) - set(runs.WORKFLOWS))
    if unknown:
        parser.error(f"unknown workflows {unknown}; choose from {list(runs.WORKFLOWS)}")
    wanted = set(args.names or runs.WORKFLOWS)
    order = [n for n in runs.WORKFLOWS if n in wanted or any(n in NEEDS.get(w, ()) for w in wanted)]
    try:
        executable = shots.chromium_path(args.chromium)
        if not (args.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI in {args.comfy_dir} (no main.py); set it up with "
                                    "tests/comfyui/setup_comfyui.py or pass --comfy-dir")
    except FileNotFoundError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="alignprop-thumbnails-") as tmp:
        base = harness.prepare_base_dir(Path(tmp))
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(shots.SETTINGS, indent=1))
        server = harness.start_server(args.comfy_dir, base)
        try:
            checkpoints = install_models(server, args.comfy_dir, args.cache_dir)
            object_info = server.object_info()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                try:
                    page = shots.new_page(browser, server, *VIEWPORT)
                    for name in order:
                        started = time.monotonic()
                        ui, graph = test_sized(name, checkpoints, object_info)
                        if name not in wanted:  # only what it writes is needed
                            server.run(graph, timeout=args.timeout)
                            print(f"[thumbnails] {name}: run for the workflows after it")
                            continue
                        jpeg = thumbnail_jpeg(shoot(page, server, ui, graph, args.timeout))
                        path = args.out_dir / f"{name}.jpg"
                        path.write_bytes(jpeg)
                        print(f"[thumbnails] {path} ({len(jpeg) / 1e3:.0f} KB) in {time.monotonic() - started:.0f} s")
                finally:
                    browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
