"""The trainer's preview image every N steps, as a browser receives it over ComfyUI's websocket.

A client connects to /ws with its clientId, queues a trainer graph with that client_id and reads
every frame until the prompt's execution_success. ComfyUI sends a node's preview as a binary frame:
a 4-byte big-endian event type 1 (PREVIEW_IMAGE), a 4-byte image type (1 = JPEG) and the JPEG; the
progress text on the node is event type 3 (TEXT: node id length, node id, UTF-8 text). A client that
does not announce "supports_preview_metadata" (like this one) gets exactly this legacy format.
"""
from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import uuid

import pytest
from PIL import Image

from test_trainer_server import trainer_graph

pytestmark = pytest.mark.slow

PREVIEW_IMAGE, TEXT = 1, 3  # ComfyUI's protocol.BinaryEventTypes
JPEG = 1


async def _run_and_listen(server, graph: dict, timeout: float) -> tuple[list[dict], list[bytes]]:
    """Queue `graph` as a websocket client; (JSON messages, binary frames) until it finishes."""
    import aiohttp

    client_id = uuid.uuid4().hex
    messages, frames = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            prompt_id = await asyncio.to_thread(server.queue, graph, client_id)
            deadline = time.monotonic() + timeout
            while True:
                message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                if message.type == aiohttp.WSMsgType.BINARY:
                    frames.append(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    messages.append(data)
                    if data.get("data", {}).get("prompt_id") == prompt_id:
                        if data["type"] == "execution_error":
                            raise AssertionError(f"the prompt failed: {data}\n{server.log_tail()}")
                        if data["type"] == "execution_success":
                            return messages, frames
                else:
                    raise AssertionError(f"websocket closed or failed: {message}\n{server.log_tail()}")


def _listen(server, graph: dict, timeout: float = 900.0):
    return asyncio.run(_run_and_listen(server, graph, timeout))


def _split(frames: list[bytes]) -> tuple[list[bytes], list[str]]:
    """(JPEG bytes of each preview frame, text of each progress-text frame of node 4)."""
    previews, texts = [], []
    for frame in frames:
        (event,) = struct.unpack(">I", frame[:4])
        if event == PREVIEW_IMAGE:
            (image_type,) = struct.unpack(">I", frame[4:8])
            assert image_type == JPEG, f"preview image type {image_type}, expected 1 (JPEG)"
            previews.append(frame[8:])
        elif event == TEXT:
            (length,) = struct.unpack(">I", frame[4:8])
            node, text = frame[8:8 + length].decode(), frame[8 + length:].decode()
            if node == "4":
                texts.append(text)
    return previews, texts


def test_preview_every_step_arrives_as_binary_jpeg_frames(server, sd15_checkpoint):
    steps = 2
    started = time.monotonic()
    messages, frames = _listen(server, trainer_graph(sd15_checkpoint, "alignprop_preview/every_step",
                                                     steps=steps, preview_every=1))
    previews, texts = _split(frames)
    print(f"\n[preview] run with preview_every=1: {time.monotonic() - started:.1f} s, {len(previews)} preview "
          f"frames ({[len(p) for p in previews]} bytes), texts {texts}")
    assert len(previews) == steps, f"expected one preview per step, got {len(previews)}"
    for jpeg in previews:
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG"
            image.load()
            assert image.width == image.height > 0  # a 64 x 64 sample, scaled to fit the preview size
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "4"]
    assert [(p["value"], p["max"]) for p in progress] == [(s, steps) for s in range(1, steps + 1)], progress
    step_texts = [t for t in texts if t.startswith("step ") and "/" in t.split(":")[0]]
    assert len(step_texts) == steps and all("preview 'cat': reward" in t for t in step_texts), texts


def test_no_preview_when_preview_every_is_zero(server, sd15_checkpoint):
    _, frames = _listen(server, trainer_graph(sd15_checkpoint, "alignprop_preview/off", steps=1, preview_every=0))
    previews, texts = _split(frames)
    assert previews == [], f"{len(previews)} preview frames with preview_every=0"
    assert texts and not any("preview" in t for t in texts), texts
