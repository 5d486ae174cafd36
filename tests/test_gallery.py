"""The gallery of a matrix run against the simulator, opened in headless Chromium over the DevTools protocol."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import engine_helpers
import pytest
from PIL import Image

from wanbatch.clock import ScaledClock
from wanbatch.gallery import GALLERY_FILE, THUMB_SIDE_PX, thumb_name, write_gallery
from wanbatch.ledger import Ledger

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; `make install` adds it)"
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: Markup, quotes and an ampersand in a prompt and in variable values: the page must show them as text.
EVIL_PROMPT = (
    '<script>window.pwned = 1</script> a "quoted" <em>lamp</em> & \'single\' <img src=x onerror="window.pwned = 2"> end'
)
INK, OIL = 'ink "wash"', "oil & <em>glaze</em>"
MATRIX = f"""\
name: gallery-matrix
defaults: {{n: 2, seed: 11, prompt_extend: false}}
prompts:
  - prompt: "a lighthouse, {{style}}"
    matrix:
      style: [{json.dumps(INK)}, {json.dumps(OIL)}]
      model: [wan2.2-t2i-flash, wan2.6-t2i]
      size: ["1280*1280", "1440*1024"]
  - prompt: {json.dumps(EVIL_PROMPT)}
    model: wan2.2-t2i-flash
    size: "1024*1024"
    n: 1
"""
SAVED = 2 * 2 * 2 * 2 + 1  # style × model × size × n, and the escaping item


def run_batch(tmp_dir: Path, manifest_text: str) -> Path:
    """Run a manifest against a fast simulator (the run writes its gallery); the run folder."""
    run_dir, report = engine_helpers.run_batch(tmp_dir, manifest_text)
    assert report["images"]["saved"] == report["images_generated"] > 0, report
    return run_dir


def gallery_of(run_dir: Path) -> Path:
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        return write_gallery(run_dir, ledger)


def metadata(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One matrix run over model, size and a variable, with its gallery; the browser tests only read it."""
    run_dir = run_batch(tmp_path_factory.mktemp("gallery"), MATRIX)
    gallery_of(run_dir)
    return run_dir


# --- headless Chromium ------------------------------------------------------------------------------


class Page:
    """One tab of a headless Chromium, driven over the DevTools protocol with aiohttp's websocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws, self._ids = ws, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        async for message in self._ws:
            answer = json.loads(message.data)
            if answer.get("id") == call_id:
                assert "error" not in answer, answer["error"]
                return answer["result"]
        raise AssertionError("the browser closed the DevTools connection")

    async def eval(self, expression: str) -> Any:
        """The value of a script expression (promises awaited), as JSON."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        """Load ``url`` afresh (its fragment applied on load, not as a change) and wait for the load event."""
        await self.call("Page.navigate", url="about:blank")
        await self.call("Page.navigate", url=url)
        for _ in range(400):
            if await self.eval(f"document.readyState === 'complete' && location.href === {json.dumps(url)}"):
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{url} did not load")


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process, log: Path) -> int:
    # With port 0 Chromium picks a free port and writes it to this file in its profile.
    port_file = profile / "DevToolsActivePort"
    for _ in range(600):
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"chromium did not start its DevTools server; its log:\n{log.read_text()[-2000:]}")


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A headless Chromium of our own (fresh profile, no network but loopback), one tab driven by DevTools."""
    assert CHROMIUM is not None
    profile, log = tmp_path / "chromium-profile", tmp_path / "chromium.log"
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # its own process group, so its helper processes stop with it
        )
    try:
        port = await _devtools_port(profile, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            ws_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()


#: Each card as the browser shows it: what it links to, its thumbnail as decoded, and whether it is visible.
CARDS_JS = """
Promise.all(Array.from(document.querySelectorAll(".card"), async (card) => {
  const img = card.querySelector("img");
  img.loading = "eager";
  const decoded = await img.decode().then(() => true, () => false);
  return {
    model: card.dataset.model, size: card.dataset.size, seed: card.dataset.seed,
    vars: JSON.parse(card.dataset.vars),
    href: decodeURIComponent(new URL(card.querySelector("a").href).pathname),
    thumb: decodeURIComponent(new URL(img.src).pathname),
    decoded, width: img.naturalWidth, height: img.naturalHeight,
    visible: card.getClientRects().length > 0,
    group: card.closest("section").dataset.group,
    prompt: card.querySelector(".prompt").textContent,
  };
}))
"""


def visible(cards: list[dict]) -> list[dict]:
    return [card for card in cards if card["visible"]]


@needs_chromium
async def test_every_saved_image_is_shown_with_its_thumbnail_and_link(page, matrix_run):
    """Every saved image has one visible card whose thumbnail decodes at ≤256 px and links to the image."""
    await page.open((matrix_run / GALLERY_FILE).as_uri())
    cards = await page.eval(CARDS_JS)
    rows = metadata(matrix_run)
    assert len(rows) == SAVED and len(cards) == SAVED
    assert all(card["visible"] and card["decoded"] for card in cards)
    assert sorted(card["href"] for card in cards) == sorted(str(matrix_run / row["file_name"]) for row in rows)
    by_file = {str(matrix_run / row["file_name"]): row for row in rows}
    for card in cards:
        row = by_file[card["href"]]
        assert card["thumb"] == str(matrix_run / thumb_name(row["file_name"]))
        assert (card["model"], card["size"], card["seed"]) == (row["model"], row["size"], str(row["seed"]))
        # metadata fills a variable an item lacks with "" (one schema for every row); the card leaves it out
        assert card["vars"] == {k: v for k, v in row["variables"].items() if v} and card["prompt"] == row["prompt"]
        width, height = (int(side) for side in row["size"].split("*"))
        assert max(card["width"], card["height"]) == THUMB_SIDE_PX
        assert abs(card["width"] / card["height"] - width / height) < 0.01
    assert await page.eval("document.getElementById('shown').textContent") == f"{SAVED} of {SAVED} images shown"
    # Grouped by model by default, each group holding that model's images only.
    assert {card["group"] for card in cards} == {"wan2.2-t2i-flash", "wan2.6-t2i"}
    assert all(card["group"] == card["model"] for card in cards)


@needs_chromium
async def test_filter_by_model_shows_only_that_model(page, matrix_run):
    """Choosing a model in its filter shows exactly that model's images, and the view survives a reload."""
    gallery = (matrix_run / GALLERY_FILE).as_uri()
    await page.open(gallery)
    expected = Counter(row["model"] for row in metadata(matrix_run))
    await page.eval(
        """(() => { const select = document.querySelector('select[data-facet="model"]');
        select.value = "wan2.6-t2i"; select.dispatchEvent(new Event("change", {bubbles: true})); })()"""
    )
    shown = visible(await page.eval(CARDS_JS))
    assert {card["model"] for card in shown} == {"wan2.6-t2i"} and len(shown) == expected["wan2.6-t2i"]
    assert await page.eval("location.hash") == "#model=wan2.6-t2i"

    await page.open(gallery + "#model=wan2.2-t2i-flash")
    shown = visible(await page.eval(CARDS_JS))
    assert {card["model"] for card in shown} == {"wan2.2-t2i-flash"} and len(shown) == expected["wan2.2-t2i-flash"]
    assert await page.eval("document.querySelector('select[data-facet=\"model\"]').value") == "wan2.2-t2i-flash"
    # The other model's group is hidden whole, not left as an empty heading.
    assert await page.eval(
        "Array.from(document.querySelectorAll('section.group:not([hidden])'), s => s.dataset.group)"
    ) == ["wan2.2-t2i-flash"]

    await page.eval("document.getElementById('show-all').click()")
    assert len(visible(await page.eval(CARDS_JS))) == SAVED and await page.eval("location.hash") == ""


@needs_chromium
async def test_filter_by_variable_and_size_grouped_by_seed(page, matrix_run):
    """A variable's value with quotes and markup filters exactly, combined with a size, grouped by seed."""
    query = urlencode({"var.style": INK, "size": "1440*1024", "group": "seed"})
    await page.open((matrix_run / GALLERY_FILE).as_uri() + "#" + query)
    cards = await page.eval(CARDS_JS)
    shown = visible(cards)
    expected = [r for r in metadata(matrix_run) if r["variables"].get("style") == INK and r["size"] == "1440*1024"]
    assert len(shown) == len(expected) == 4  # two models × n=2
    assert all(card["vars"] == {"style": INK} and card["size"] == "1440*1024" for card in shown)
    assert {card["group"] for card in cards} == {"11", "12"} and all(card["group"] == card["seed"] for card in cards)
    headings = await page.eval("Array.from(document.querySelectorAll('section.group h2'), h => h.textContent)")
    assert headings == ["seed: 11" + "2 images", "seed: 12" + "2 images"]


@needs_chromium
async def test_prompts_and_values_are_escaped(page, matrix_run):
    """Markup and quotes in prompts and variables are shown as text: no script runs, no element is made."""
    html_text = (matrix_run / GALLERY_FILE).read_text()
    assert "<script>window.pwned" not in html_text and "<em>" not in html_text
    await page.open((matrix_run / GALLERY_FILE).as_uri())
    assert await page.eval("window.pwned === undefined && document.scripts.length === 1")
    assert await page.eval("document.querySelectorAll('#gallery em, #gallery [onerror], #gallery script').length") == 0
    prompts = await page.eval("Array.from(document.querySelectorAll('.prompt'), p => p.textContent)")
    assert prompts.count(EVIL_PROMPT) == 1
    titles = await page.eval("Array.from(document.querySelectorAll('.prompt'), p => p.title)")
    assert EVIL_PROMPT in titles
    options = await page.eval(
        "Array.from(document.querySelectorAll('select[data-facet=\"var.style\"] option'), o => o.value)"
    )
    assert options == ["", "", INK, OIL]  # all, the item without the variable, then the two values


# --- without a browser -------------------------------------------------------------------------------


class _Cards(HTMLParser):
    """The cards of a gallery page as the markup has them: their attributes and the text of each."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self.cards.append({"attrs": dict(attrs), "text": "", "img": None})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = dict(attrs)

    def handle_data(self, data: str) -> None:
        if self.cards:
            self.cards[-1]["text"] += data


def parse_cards(path: Path) -> list[dict]:
    parser = _Cards()
    parser.feed(path.read_text())
    return parser.cards


def test_thumbnails_are_made_once_and_again_when_the_image_changes(matrix_run, tmp_path):
    """A second gallery reuses every thumbnail; an image newer than its thumbnail gets a new one."""
    run_dir = Path(shutil.copytree(matrix_run, tmp_path / "run"))
    thumbs = sorted((run_dir / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == SAVED
    before = {path: path.stat().st_mtime_ns for path in thumbs}
    changed = run_dir / metadata(run_dir)[0]["file_name"]
    later = max(before.values()) + 10**9
    os.utime(changed, ns=(later, later))
    gallery_of(run_dir)
    remade = [path for path in thumbs if path.stat().st_mtime_ns != before[path]]
    assert remade == [run_dir / thumb_name(metadata(run_dir)[0]["file_name"])]
    with Image.open(remade[0]) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == THUMB_SIDE_PX


def test_a_missing_image_gets_a_card_that_says_so(matrix_run, tmp_path):
    """An image deleted after it was saved still has its card, saying it is missing, and the page is written."""
    run_dir = Path(shutil.copytree(matrix_run, tmp_path / "run"))
    shutil.rmtree(run_dir / "thumbs")
    gone = metadata(run_dir)[0]
    (run_dir / gone["file_name"]).unlink()
    cards = parse_cards(gallery_of(run_dir))
    assert len(cards) == SAVED
    missing = [card for card in cards if card["img"] is None]
    assert len(missing) == 1 and "image missing or unreadable" in missing[0]["text"]
    assert gone["prompt"] in missing[0]["text"]
    assert len(list((run_dir / "thumbs").rglob("*.jpg"))) == SAVED - 1


def test_values_are_escaped_in_the_markup(matrix_run):
    """The page's markup gives back each prompt and variable exactly once parsed, whatever it holds."""
    cards = parse_cards(matrix_run / GALLERY_FILE)
    assert sum(EVIL_PROMPT in card["text"] for card in cards) == 1
    evil = next(card for card in cards if EVIL_PROMPT in card["text"])
    assert evil["img"]["alt"] == EVIL_PROMPT and json.loads(evil["attrs"]["data-vars"]) == {}
    styles = Counter(json.loads(card["attrs"]["data-vars"]).get("style") for card in cards)
    assert styles == {INK: 8, OIL: 8, None: 1}


def test_an_empty_run_gets_a_page_that_says_so(tmp_path):
    """A run folder with nothing saved yet gets a gallery that says so rather than failing."""
    with Ledger.open(tmp_path, clock=ScaledClock()) as ledger:
        path = write_gallery(tmp_path, ledger)
    assert parse_cards(path) == [] and "No saved images yet." in path.read_text()


def test_a_small_image_is_its_own_thumbnail(tmp_path):
    """An image no larger than twice a thumbnail is shown as it is, at thumbnail size, with no thumbnail made;
    once deleted, its card says so."""
    run_dir = run_batch(
        tmp_path,
        """\
        name: gallery-small
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1, prompt_extend: false}
        prompts: ["a small lighthouse"]
        """,
    )
    (row,) = metadata(run_dir)
    (card,) = parse_cards(run_dir / GALLERY_FILE)
    assert card["img"]["src"] == row["file_name"]
    assert (card["img"]["width"], card["img"]["height"]) == (str(THUMB_SIDE_PX), str(THUMB_SIDE_PX))
    assert not (run_dir / "thumbs").exists()
    (run_dir / row["file_name"]).unlink()
    (card,) = parse_cards(gallery_of(run_dir))
    assert card["img"] is None and "image missing or unreadable" in card["text"]
