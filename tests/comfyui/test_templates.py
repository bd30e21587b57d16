"""The example workflows in ComfyUI's template browser, on the real server and in the real frontend.

ComfyUI's ``GET /workflow_templates`` lists, per custom-node folder, the ``workflows/*.json`` files
it finds, and serves that folder at ``/api/workflow_templates/<pack>/``; the frontend shows each
listed name as a card whose picture is ``<name>.jpg`` from there (it falls back to a stock image
when that fails). This module checks that

1. the server lists exactly the pack's UI workflows (no API twin) under the pack's folder name;
2. each workflow and its thumbnail are served (the thumbnail as ``image/jpeg``, the committed bytes);
3. in headless Chromium, the template browser (command ``Comfy.BrowseTemplates``) has the pack in
   its navigation, and the pack's section shows one card per workflow whose picture is the
   committed thumbnail, loaded (its pixel size, not the fallback's);
4. clicking a card loads that workflow onto the canvas.

Chromium is the system one (see test_browser_workflows.py); without it the browser tests skip.
"""
from __future__ import annotations

import json
import time
import urllib.request

import pytest
from PIL import Image

import harness
from test_browser_workflows import chromium_path
from test_workflows import WORKFLOWS, WORKFLOWS_DIR

pytestmark = pytest.mark.slow

PACK = harness.PACK_NAME
FALLBACK_IMAGE = "default-template.png"  # what the frontend shows when a thumbnail does not load
CLICKED = "score_ksampler_batch"


def template_url(server, file_name: str) -> str:
    return f"{server.url}/api/workflow_templates/{PACK}/{file_name}"


def test_server_lists_exactly_the_ui_workflows_under_the_pack_name(server):
    listing = server._request("/workflow_templates")
    assert PACK in listing, f"/workflow_templates lists no {PACK}: {listing}"
    assert sorted(listing[PACK]) == sorted(WORKFLOWS), (
        f"/workflow_templates lists {sorted(listing[PACK])} for {PACK}, expected the UI workflows {sorted(WORKFLOWS)}")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_template_and_its_thumbnail_are_served(server, name):
    with urllib.request.urlopen(template_url(server, f"{name}.json"), timeout=30) as response:
        assert json.loads(response.read()) == json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    with urllib.request.urlopen(template_url(server, f"{name}.jpg"), timeout=30) as response:
        assert response.status == 200
        assert response.headers.get("Content-Type", "").startswith("image/jpeg"), response.headers
        assert response.read() == (WORKFLOWS_DIR / f"{name}.jpg").read_bytes()


@pytest.fixture(scope="module")
def template_browser(server):
    """The app with the template browser open on the pack's section; (page, responses seen)."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary (install Debian's chromium: apt-get install -y chromium, or set "
                    "ALIGNPROP_CHROMIUM); .ci/run installs it in CI")
    from playwright.sync_api import sync_playwright

    responses: list[tuple[str, int, str]] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # nothing may leave this machine (the app asks api.comfy.org about nodes)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                       else route.abort())
            page.on("response", lambda r: responses.append((r.url, r.status, r.headers.get("content-type", ""))))
            started = time.monotonic()
            page.goto(server.url, wait_until="domcontentloaded", timeout=180_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                                   timeout=300_000)
            page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.get_by_role("button", name=PACK, exact=True).click(timeout=120_000)
            page.wait_for_selector(f'[data-testid="template-workflow-{WORKFLOWS[0]}"]', timeout=60_000)
            print(f"\n[templates] template browser on {PACK} in {time.monotonic() - started:.1f} s")
            yield page, responses
        finally:
            browser.close()


# The pictures of one card: source, whether loaded, pixel size.
CARD_IMAGES = """(selector) => [...document.querySelectorAll(selector + ' img')].map(
    i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"""
CARD_PICTURE_LOADED = """(selector) => [...document.querySelectorAll(selector + ' img')].some(
    i => i.complete && i.naturalWidth > 0 && !i.src.includes('%s'))""" % FALLBACK_IMAGE


def test_template_browser_shows_every_example_with_its_thumbnail(template_browser, server):
    page, responses = template_browser
    cards = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
        .map(card => card.dataset.testid.slice('template-workflow-'.length))""")
    assert sorted(cards) == sorted(WORKFLOWS), f"the {PACK} section shows {sorted(cards)}"
    for name in WORKFLOWS:
        selector = f'[data-testid="template-workflow-{name}"]'
        card = page.locator(selector)
        card.scroll_into_view_if_needed()  # the pictures load lazily, when near the view
        assert name in card.inner_text(), f"the card of {name} is titled {card.inner_text()!r}"
        try:
            page.wait_for_function(CARD_PICTURE_LOADED, arg=selector, timeout=30_000)
        except Exception:
            pytest.fail(f"the card of {name} shows no thumbnail: {page.evaluate(CARD_IMAGES, selector)}; "
                        f"responses: {[r for r in responses if name in r[0]]}")
        with Image.open(WORKFLOWS_DIR / f"{name}.jpg") as thumbnail:
            size = thumbnail.size
        shown = [(i["width"], i["height"]) for i in page.evaluate(CARD_IMAGES, selector)
                 if FALLBACK_IMAGE not in i["src"]]
        assert shown == [size], f"the card of {name} shows pictures of {shown} pixels, its thumbnail has {size}"
        fetched = [(status, kind) for url, status, kind in responses if url == template_url(server, f"{name}.jpg")]
        assert fetched and all(status == 200 and kind.startswith("image/") for status, kind in fetched), (
            f"the browser's requests for {name}.jpg got {fetched}")


def test_clicking_a_template_loads_its_workflow(template_browser):
    page, _ = template_browser
    expected = sorted(node["type"] for node in json.loads((WORKFLOWS_DIR / f"{CLICKED}.json").read_text())["nodes"])
    page.locator(f'[data-testid="template-workflow-{CLICKED}"]').click()
    page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(expected), timeout=60_000)
    loaded = sorted(page.evaluate("() => window.app.graph._nodes.map(node => node.type)"))
    assert loaded == expected, f"clicking {CLICKED} loaded {loaded}"
