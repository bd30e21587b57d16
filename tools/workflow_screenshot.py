"""Dev tool: a PNG of a workflow as ComfyUI's own web app draws it, for the README and docs.

It starts the test ComfyUI server (tests/comfyui/harness.py: CPU only, on 127.0.0.1 only, every
writable folder in a temporary base directory with this repository linked in as the node pack),
opens the app in the system Chromium through the ``playwright`` package (no browser is downloaded;
requests that leave the server are refused), and loads the workflow with ``app.loadGraphData``.
Model dropdowns whose file is not on the server get an empty file of that name in the matching model
folder, then the page is reloaded, so they show the workflow's file names instead of "undefined".
Menus, side bar, minimap and canvas info are hidden, the graph is fitted into the viewport and the
screenshot is cropped to it; a PNG over MAX_PNG_BYTES is quantised to a 256-colour palette. The
server and the temporary directory are removed at exit.

Needs ComfyUI set up (tests/comfyui/setup_comfyui.py, or any earlier slow test run) and Debian's
``chromium``. Regenerate the README's image with::

    /work/main/.venv/bin/python tools/workflow_screenshot.py \\
        workflows/train_aesthetic_lora.json docs/images/train_aesthetic_lora.png
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfyui"))
import harness  # noqa: E402

# The model folder a dropdown lists, by input name (ComfyUI's loaders and this pack's reward nodes).
MODEL_FOLDER_OF_INPUT = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "clip_name": "clip_vision",
    "clip_vision_file": "clip_vision",
    "head": "reward_models",
    "unet_name": "diffusion_models",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
}
CHROMIUM_NAMES = ("chromium", "chromium-browser")
MAX_PNG_BYTES = 400_000  # larger screenshots are quantised to a palette
MARGIN_PX = 24  # space around the graph in the image, in screen pixels

# Frontend settings (user/default/comfy.settings.json) for a bare canvas: no first-run template
# browser, minimap, zoom menu, fps overlay or missing-model dialog; full detail at any zoom.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Canvas.SelectionToolbox": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.Persist": False,
    "Comfy.Notification.ShowVersionUpdates": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
}
# What the settings cannot turn off: the side tool bar and the overlay holding the top menu, the
# Run bar and the panels; toasts.
HIDE_CSS = """
.side-toolbar-container, .splitter-overlay-root, .p-toast { display: none !important; }
"""
APP_READY = "() => window.app && window.app.graph && window.app.graph._nodes !== undefined"

# Load the workflow; list each combo widget whose value is not among its options.
LOAD_AND_FIND_MISSING = """async (workflow) => {
    await window.app.loadGraphData(workflow);
    const missing = [];
    for (const node of window.app.graph._nodes) {
        for (const widget of node.widgets || []) {
            const values = widget.options && widget.options.values;
            if (widget.type === "combo" && Array.isArray(values) && !values.includes(widget.value)) {
                missing.push({node: node.title || node.type, widget: widget.name, value: String(widget.value)});
            }
        }
    }
    return missing;
}"""

# Scale and move the canvas so the bounds of all nodes fill the viewport less the margin; return
# those bounds on screen.
FIT_GRAPH = """async (margin) => {
    const canvas = window.app.canvas, ds = canvas.ds;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const node of window.app.graph._nodes) {
        const [x, y, w, h] = node.boundingRect;
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    const width = window.innerWidth, height = window.innerHeight;
    ds.scale = Math.min((width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
    ds.offset[0] = (width / ds.scale - (x1 - x0)) / 2 - x0;
    ds.offset[1] = (height / ds.scale - (y1 - y0)) / 2 - y0;
    canvas.setDirty(true, true);
    await document.fonts.ready;
    // two frames: one draws the canvas, the next places the DOM widgets (text areas) over it
    await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    const left = (x0 + ds.offset[0]) * ds.scale, top = (y0 + ds.offset[1]) * ds.scale;
    return {x: left, y: top, width: (x1 - x0) * ds.scale, height: (y1 - y0) * ds.scale, scale: ds.scale};
}"""


@dataclass
class Shot:
    """A screenshot and what it took: the PNG, the canvas zoom, the dummy model files written."""

    png: bytes
    scale: float
    placed: list[str]


def chromium_path(explicit: str | None) -> str:
    """The Chromium binary to drive: --chromium, else $ALIGNPROP_CHROMIUM (as the browser tests),
    else chromium / chromium-browser on PATH."""
    explicit = explicit or os.environ.get("ALIGNPROP_CHROMIUM")
    candidates = [explicit] if explicit else [shutil.which(name) for name in CHROMIUM_NAMES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    tried = explicit or " or ".join(CHROMIUM_NAMES) + " on PATH"
    raise FileNotFoundError(f"no Chromium found (tried {tried}); install Debian's chromium "
                            "(apt-get install -y chromium) or pass --chromium PATH")


def load_ui_workflow(path: Path) -> dict:
    """The UI-format workflow at path; a clear error for a missing file or an API-format graph."""
    if not path.is_file():
        raise FileNotFoundError(f"no workflow file {path}; give a UI-format workflow such as "
                                "workflows/train_aesthetic_lora.json")
    try:
        workflow = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); give a workflow saved by ComfyUI") from None
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise ValueError(f"{path} has no 'nodes' list, so it is not a UI-format workflow; an API-format "
                         "<name>.api.json cannot be drawn, give its <name>.json twin")
    return workflow


def place_dummy_models(missing: list[dict], models_dir: Path) -> tuple[list[str], list[str]]:
    """Write an empty file for each missing dropdown value whose input names a known model folder.

    Returns:
        (the files written, relative to models_dir; warnings for values left alone).
    """
    placed, skipped = [], []
    for item in missing:
        folder = MODEL_FOLDER_OF_INPUT.get(item["widget"])
        name = item["value"]
        where = f"{item['node']}.{item['widget']} = {name!r}"
        if folder is None:
            skipped.append(f"{where}: no model folder known for input {item['widget']!r} "
                           "(add it to MODEL_FOLDER_OF_INPUT)")
            continue
        root = (models_dir / folder).resolve()
        path = (root / name).resolve()
        if not name or not path.is_relative_to(root) or path == root:
            skipped.append(f"{where}: not a file name inside models/{folder}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        placed.append(f"{folder}/{name}")
    return placed, skipped


def close_dialogs(page) -> int:
    """Close every open dialog (e.g. missing models) with its close button, or Escape; return how many."""
    closed = 0
    for _ in range(5):
        dialogs = page.locator(".p-dialog:visible")
        if dialogs.count() == 0:
            break
        button = dialogs.first.locator(".p-dialog-close-button")
        if button.count():
            button.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        closed += 1
    return closed


def new_page(browser, server: harness.Server, width: int, height: int):
    """A page of browser that may reach only server, with the "try Nodes 2.0" banner dismissed."""
    page = browser.new_page(viewport={"width": width, "height": height})
    # the app asks api.comfy.org about nodes; nothing may leave this machine
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
               else route.abort())
    # dismissed "try Nodes 2.0" banner, as the frontend remembers it
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    return page


def open_app(page, server: harness.Server) -> None:
    """Load ComfyUI's web app in page and wait until its graph exists."""
    page.goto(server.url, wait_until="domcontentloaded", timeout=180_000)
    page.wait_for_function(APP_READY, timeout=300_000)


def graph_clip(page, width: int, height: int) -> tuple[dict, float]:
    """Hide the app's chrome, fit the graph into the viewport; return the screenshot clip around the
    graph and the canvas zoom."""
    # (not page.add_style_tag: it fails on any CSP report, and the app's blocked calls to
    # api.comfy.org raise some)
    page.evaluate("(css) => { const style = document.createElement('style'); "
                  "style.textContent = css; document.head.appendChild(style); }", HIDE_CSS)
    if closed := close_dialogs(page):
        print(f"[screenshot] closed {closed} dialog(s)", file=sys.stderr)
    box = page.evaluate(FIT_GRAPH, MARGIN_PX)
    clip = {"x": max(0.0, box["x"] - MARGIN_PX), "y": max(0.0, box["y"] - MARGIN_PX)}
    clip["width"] = min(width - clip["x"], box["width"] + 2 * MARGIN_PX)
    clip["height"] = min(height - clip["y"], box["height"] + 2 * MARGIN_PX)
    return clip, box["scale"]


def take_screenshot(server: harness.Server, workflow: dict, executable: str, width: int, height: int) -> Shot:
    """Load workflow in the app served by server and return the cropped screenshot of its graph."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = new_page(browser, server, width, height)
            open_app(page, server)
            missing = page.evaluate(LOAD_AND_FIND_MISSING, workflow)
            placed, skipped = place_dummy_models(missing, server.models_dir)
            for warning in skipped:
                print(f"[screenshot] left as it is: {warning}", file=sys.stderr)
            if placed:  # the dropdown lists are read when the app starts
                open_app(page, server)
                missing = page.evaluate(LOAD_AND_FIND_MISSING, workflow)
                for item in missing:
                    if MODEL_FOLDER_OF_INPUT.get(item["widget"]):
                        raise RuntimeError(f"{item['node']}.{item['widget']} still misses {item['value']!r} "
                                           f"after placing it in the models folder\n{server.log_tail()}")
            clip, scale = graph_clip(page, width, height)
            return Shot(png=page.screenshot(clip=clip), scale=scale, placed=placed)
        finally:
            browser.close()


def write_png(png: bytes, path: Path, max_bytes: int = MAX_PNG_BYTES) -> int:
    """Save png to path, quantised to 256 colours (no dithering: text stays crisp) if it is larger
    than max_bytes; return the size written."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        palette = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        palette.save(buffer, format="PNG", optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.tell()


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: server stopped, temp dir removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="UI-format workflow JSON, e.g. workflows/train_aesthetic_lora.json")
    parser.add_argument("output", type=Path, help="PNG to write, e.g. docs/images/train_aesthetic_lora.png")
    parser.add_argument("--width", type=int, default=1600, help="browser viewport width in pixels")
    parser.add_argument("--height", type=int, default=900, help="browser viewport height in pixels")
    parser.add_argument("--comfy-dir", type=Path, default=harness.DEFAULT_COMFY_DIR,
                        help="the ComfyUI directory holding main.py (default: the tests' .cache copy)")
    parser.add_argument("--chromium", help="Chromium binary (default: $ALIGNPROP_CHROMIUM, else chromium on PATH)")
    args = parser.parse_args(argv)

    if args.output.suffix.lower() != ".png":
        parser.error(f"output must end in .png, got {args.output}")
    if args.width < 400 or args.height < 300:
        parser.error(f"the viewport must be at least 400x300 pixels, got {args.width}x{args.height}")
    try:
        workflow = load_ui_workflow(args.workflow)
        executable = chromium_path(args.chromium)
        if not (args.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI in {args.comfy_dir} (no main.py); set it up with "
                                    "tests/comfyui/setup_comfyui.py or pass --comfy-dir")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="alignprop-screenshot-") as tmp:
        base = harness.prepare_base_dir(Path(tmp))
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(SETTINGS, indent=1))
        server = harness.start_server(args.comfy_dir, base)
        try:
            shot = take_screenshot(server, workflow, executable, args.width, args.height)
        finally:
            server.stop()
    size = write_png(shot.png, args.output)
    placed = ", ".join(shot.placed) or "none"
    print(f"[screenshot] {args.workflow} -> {args.output} ({size / 1e3:.0f} KB, canvas zoom {shot.scale:.2f}, "
          f"empty model files: {placed}) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
