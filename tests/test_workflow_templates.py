"""The example workflows as ComfyUI's template browser finds them, checked on the files alone.

ComfyUI lists every ``workflows/*.json`` of a node pack as a template and its frontend shows
``workflows/<name>.jpg`` as the template's picture (tools/make_thumbnails.py makes them), so that
folder holds the UI workflows and their thumbnails and nothing else; the API twins live in
``workflows/api/``. The frontend shows no description for a node pack's template (only its file
name), so each workflow describes itself in the first line of its Note, which the canvas shows once
it is loaded, and in its row of the README's table. tests/comfyui/test_templates.py checks the same
on a running server and in the browser.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
MAX_THUMBNAIL_BYTES = 100_000
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def test_the_workflows_folder_holds_ui_workflows_thumbnails_and_the_api_folder_only():
    others = sorted(p.name for p in WORKFLOWS.iterdir()
                    if not (p.is_file() and p.suffix in (".json", ".jpg")) and not (p.is_dir() and p.name == "api"))
    assert not others, f"workflows/ may hold only <name>.json, <name>.jpg and api/, found {others}"
    assert NAMES, "no example workflows in workflows/"


def test_every_workflow_has_a_thumbnail_and_every_thumbnail_a_workflow():
    thumbnails = sorted(p.stem for p in WORKFLOWS.glob("*.jpg"))
    assert thumbnails == NAMES, (
        f"workflows without a thumbnail: {sorted(set(NAMES) - set(thumbnails))}; thumbnails without a "
        f"workflow: {sorted(set(thumbnails) - set(NAMES))}; make them with tools/make_thumbnails.py")


def test_every_api_twin_has_its_ui_workflow():
    twins = sorted(p.name[: -len(".api.json")] for p in (WORKFLOWS / "api").glob("*.api.json"))
    assert twins == NAMES, f"workflows/api/ twins {twins} vs UI workflows {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_each_thumbnail_is_a_small_jpeg(name):
    path = WORKFLOWS / f"{name}.jpg"
    size = path.stat().st_size
    assert size <= MAX_THUMBNAIL_BYTES, f"{path.name} has {size} bytes; keep thumbnails under {MAX_THUMBNAIL_BYTES}"
    with Image.open(path) as image:
        assert image.format == "JPEG", f"{path.name} is {image.format}; the frontend asks for JPEG"
        assert 256 <= image.width <= 1024 and image.height >= 128, f"{path.name} is {image.size}"


@pytest.mark.parametrize("name", NAMES)
def test_each_json_is_a_ui_workflow_that_describes_itself_in_one_line(name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert isinstance(workflow.get("nodes"), list), (
        f"{name}.json is not a UI workflow, yet ComfyUI lists it as a template; API twins go to workflows/api/")
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, f"{name}.json needs exactly one Note"
    first = notes[0].splitlines()[0]
    assert first.startswith("AlignProp: ") and len(first) <= 200, (
        f"{name}.json's Note should open with a one-line 'AlignProp: <what it does>', got {first!r}")


@pytest.mark.parametrize("name", NAMES)
def test_the_readme_describes_each_workflow(name):
    readme = (ROOT / "README.md").read_text()
    assert f"| [`{name}.json`](workflows/{name}.json) | " in readme, f"README.md's workflow table lacks {name}.json"
