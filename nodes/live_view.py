"""The AlignProp Trainer's live view, server side: runs as `LiveRun`s, sent over ComfyUI's websocket.

Each trainer execution gets a `LiveRun` (alignprop_core.training.live) under its node id. Its
messages go to every connected browser as the `alignprop.live` event, no more than two a second;
the frontend extension (web/alignprop_live.js) draws them on the node. GET /alignprop/live returns
the whole state of the latest runs, so a page loaded or reloaded mid-run (or after it) shows the
run again. Preview images are written to ComfyUI's temp folder and sent as /view references.
"""
from __future__ import annotations

import math
import os
import threading
import uuid
from collections import OrderedDict

from alignprop_core.training.live import LiveRun

EVENT = "alignprop.live"
ROUTE = "/alignprop/live"
PREVIEW_SUBFOLDER = "alignprop_live"
KEEP_RUNS = 16  # runs the route still returns after they end (the latest per trainer node)

_RUNS: OrderedDict[str, LiveRun] = OrderedDict()  # node id -> its latest run
_LOCK = threading.Lock()
_ROUTES_ADDED = False


def start_run(node_id: str | None, total: int) -> LiveRun:
    """A new run for trainer node `node_id` (it replaces that node's previous run)."""
    run = LiveRun(run_id=uuid.uuid4().hex[:12], total=total)
    with _LOCK:
        _RUNS.pop(str(node_id), None)
        _RUNS[str(node_id)] = run
        while len(_RUNS) > KEEP_RUNS:
            _RUNS.popitem(last=False)
    return run


def publish(run: LiveRun, node_id: str | None, force: bool = False) -> None:
    """Send what changed, when the throttle allows it (or `force`), to every connected browser."""
    if node_id is None or not (force or run.due()):
        return
    server = _server()
    message = {"node": str(node_id), **run.message()}
    if server is not None:
        server.send_sync(EVENT, message)


def save_preview(run: LiveRun, image, step: int, prompt: str, reward: float) -> None:
    """Write a preview (PIL image) to the temp folder and make it the run's latest preview."""
    import folder_paths

    folder = os.path.join(folder_paths.get_temp_directory(), PREVIEW_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    name = f"{run.run_id}_{step:06d}.png"
    image.save(os.path.join(folder, name))
    old = (run.preview or {}).get("filename")
    run.set_preview({"filename": name, "subfolder": PREVIEW_SUBFOLDER, "type": "temp", "step": step,
                     "prompt": prompt, "reward": reward if math.isfinite(reward) else None})
    if old and old != name:  # only the latest is shown; a long run should not fill the temp folder
        try:
            os.remove(os.path.join(folder, old))
        except OSError:
            pass


def runs_state() -> dict:
    """{"runs": [the whole state of each kept run, with its node id]} (oldest first)."""
    with _LOCK:
        runs = list(_RUNS.items())
    return {"runs": [{"node": node_id, **run.state()} for node_id, run in runs]}


def register_routes() -> None:
    """Add GET /alignprop/live to ComfyUI's server (once; nothing without a server)."""
    global _ROUTES_ADDED
    server = _server()
    if server is None or _ROUTES_ADDED:
        return
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def live_runs(request):
        return web.json_response(runs_state())

    _ROUTES_ADDED = True


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)
