"""The real page in headless Chromium (Playwright): text query, image upload, drag-and-drop, hubness toggle,
API-key mode. Screenshots go to test-artifacts/. Skipped when Chromium or Playwright is missing.

The page's Content-Security-Policy stays on (it forbids eval), so wait predicates are written as functions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ARTIFACTS, MICRO_TRAIN, run_in_process, write_tiny_manifest
from test_serve_api import KEY, make_index, shared_coca_index

from tests.conftest import CHROMIUM_ARGS
from xmodal.serve import start_in_thread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
ARGS = CHROMIUM_ARGS

THUMBS_LOADED = """(min) => {
  const imgs = [...document.querySelectorAll('#results .result img')];
  return imgs.length >= min && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out, manifest, enc = make_index(tmp_path_factory.mktemp("browser"))
    server = start_in_thread(out, encoder=enc)
    keyed = start_in_thread(out, encoder=enc, api_key=KEY)
    yield server, keyed, manifest
    server.stop()
    keyed.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_text_query_then_image_upload(site, page):
    server, _, manifest = site
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert "40 items" in page.inner_text("#info")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function(THUMBS_LOADED, arg=10, timeout=30_000)
    assert page.locator("#results .result").count() == 10
    assert page.inner_text("#results .result .caption >> nth=0")
    assert "10 images" in page.inner_text("#status")
    shot(page, "serve_text_query.png")

    page.set_input_files("#file", str(manifest.parent / "img_011.png"))
    page.wait_for_function(
        "() => document.querySelector('#results').dataset.kind === 'image'", timeout=30_000
    )
    page.wait_for_function(THUMBS_LOADED, arg=10, timeout=30_000)
    assert page.get_attribute("#results .result >> nth=0", "data-id") == "img_011.png"
    assert page.is_visible("#query-preview")
    assert not page.is_visible("#query-caption")  # xm-micro has no caption decoder: nothing shown
    shot(page, "serve_image_query.png")
    assert page.errors == [], page.errors  # no CSP violations or script errors


def test_drag_and_drop_and_hubness_toggle(site, page):
    server, _, manifest = site
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    # A real drop event carrying a File, as a browser builds it when a file is dragged in.
    data = list((manifest.parent / "img_005.png").read_bytes())
    page.evaluate(
        """(bytes) => {
      const file = new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'});
      const dt = new DataTransfer();
      dt.items.add(file);
      const zone = document.getElementById('drop');
      for (const type of ['dragenter', 'dragover', 'drop']) {
        zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
      }
    }""",
        data,
    )
    page.wait_for_function(
        "() => document.querySelector('#results').dataset.kind === 'image'", timeout=30_000
    )
    page.wait_for_function(THUMBS_LOADED, arg=5, timeout=30_000)
    assert page.get_attribute("#results .result >> nth=0", "data-id") == "img_005.png"

    assert page.is_visible("#hub-controls")  # the index has banks
    page.check("#hubness")
    page.select_option("#norm", "qbnorm")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.includes('qbnorm')", timeout=30_000
    )
    page.wait_for_function(THUMBS_LOADED, arg=10, timeout=30_000)
    shot(page, "serve_hubness.png")

    page.fill("#q", "")
    page.press("#q", "Enter")
    assert page.locator("#status.error").count() == 1
    assert page.errors == [], page.errors


def test_api_key_mode(site, page):
    _, keyed, _ = site
    page.goto(keyed.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#api-key")
    page.fill("#q", "a green square")
    page.press("#q", "Enter")
    page.wait_for_selector("#status.error")
    assert "API key" in page.inner_text("#status")
    page.fill("#api-key", KEY)
    page.press("#q", "Enter")
    page.wait_for_function(THUMBS_LOADED, arg=10, timeout=30_000)  # thumbnails fetched with the header
    shot(page, "serve_api_key.png")


@pytest.fixture(scope="module")
def rerank_site(tmp_path_factory):
    """A server over an index of a clip+itm run with ITM re-ranking on (top 8)."""
    from xmodal.index import build_index
    from xmodal.models import load_encoder

    root = tmp_path_factory.mktemp("browser-rerank")
    manifest = write_tiny_manifest(root / "data", n=20)
    run_in_process(
        "train",
        "--data",
        manifest,
        "--out",
        root / "run",
        *MICRO_TRAIN,
        "--steps",
        "4",
        "--objective",
        "clip+itm",
    )
    enc = load_encoder(root / "run", device="cpu")
    build_index(
        enc, manifest, root / "idx", model_source=str(root / "run"), progress=False, log=lambda m: None
    )
    server = start_in_thread(root / "idx", encoder=enc, rerank=8)
    yield server
    server.stop()


def test_rerank_badge_and_itm_scores(rerank_site, page):
    page.goto(rerank_site.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#rerank-badge") and "top 8" in page.inner_text("#rerank-badge")
    assert page.is_checked("#rerank")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function(THUMBS_LOADED, arg=8, timeout=30_000)
    assert "re-ranked by ITM (top 8)" in page.inner_text("#status")
    itm = page.locator("#results .result .itm")
    assert itm.count() == 10  # k=10 > 8: the last two show "ITM —"
    assert page.inner_text("#results .result .itm >> nth=0").startswith("ITM ")
    assert page.inner_text("#results .result .itm >> nth=9") == "ITM —"
    shot(page, "serve_rerank.png")
    page.uncheck("#rerank")  # off per request: no badge, plain order, no ITM scores
    assert not page.is_visible("#rerank-badge")
    page.press("#q", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#results').dataset.reranked === '0'", timeout=30_000
    )
    assert page.locator("#results .result .itm").count() == 0
    assert page.errors == [], page.errors


@pytest.fixture(scope="module")
def coca_site(tmp_path_factory, coca_run):
    """A server over an image folder indexed by the tiny CoCa run with generated captions."""
    out, photos, enc = shared_coca_index(tmp_path_factory, coca_run)
    server = start_in_thread(out, encoder=enc)
    yield server, photos
    server.stop()


def test_image_query_shows_the_models_caption(coca_site, page):
    import httpx

    server, photos = coca_site
    query = photos / "img_004.png"
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert not page.is_visible("#query-caption")
    page.set_input_files("#file", str(query))
    page.wait_for_selector("#query-caption", state="visible", timeout=30_000)
    page.wait_for_function(THUMBS_LOADED, arg=8, timeout=30_000)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        expected = c.post("/caption", files={"file": ("q.png", query.read_bytes(), "image/png")}).json()
    assert page.inner_text("#query-caption-text") == expected["caption"]
    assert page.inner_text("#query-caption").startswith("the model sees:")
    assert page.locator("#results .result .caption .generated").count() == 8  # every caption generated
    shot(page, "serve_image_caption.png")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#results').dataset.kind === 'text'", timeout=30_000)
    assert not page.is_visible("#query-caption")  # a text query has no query image to caption
    assert page.errors == [], page.errors
