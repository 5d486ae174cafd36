"""The gallery of a matrix run against the simulator, opened in headless Chromium over the DevTools protocol."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from PIL import Image

from benchmarks.chromium import CHROMIUM, Page, first_cards_ms, open_page
from benchmarks.gallery import synthetic_run
from helpers.engine import run_batch
from helpers.outputs import metadata
from wanbatch.clock import ScaledClock
from wanbatch.ledger import Ledger, Recorded, SqliteLedger
from wanbatch.ledger.states import ItemState
from wanbatch.outputs.gallery import DATA_FILE, GALLERY_FILE, THUMB_SIDE_PX, Thumbnailer, thumb_name, write_gallery
from wanbatch.outputs.gallery.data import MAX_SELECT_VALUES, Card, gallery_data

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; `make install` adds it)"
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


def gallery_of(run_dir: Path) -> Path:
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        return asyncio.run(write_gallery(run_dir, SqliteLedger(ledger)))


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One matrix run over model, size and a variable, with its gallery; the browser tests only read it."""
    run_dir = run_batch(tmp_path_factory.mktemp("gallery"), MATRIX)
    gallery_of(run_dir)
    return run_dir


# --- headless Chromium ------------------------------------------------------------------------------


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A headless Chromium of our own (fresh profile, no network but loopback), one tab driven by DevTools."""
    async with open_page(tmp_path) as tab:
        yield tab


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
    assert "window.pwned" not in html_text and "<em>" not in html_text
    await page.open((matrix_run / GALLERY_FILE).as_uri())
    assert await page.eval("window.pwned === undefined && document.scripts.length === 2")
    assert await page.eval("document.querySelectorAll('#gallery em, #gallery [onerror], #gallery script').length") == 0
    prompts = await page.eval("Array.from(document.querySelectorAll('.prompt'), p => p.textContent)")
    assert prompts.count(EVIL_PROMPT) == 1
    titles = await page.eval("Array.from(document.querySelectorAll('.prompt'), p => p.title)")
    assert EVIL_PROMPT in titles
    options = await page.eval(
        "Array.from(document.querySelectorAll('select[data-facet=\"var.style\"] option'), o => o.value)"
    )
    assert options == ["", "", INK, OIL]  # all, the item without the variable, then the two values


LARGE = 20_000


@pytest.fixture(scope="module")
def large_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic run folder of 20,000 saved images (2 models × 3 styles × 3,334 subjects) with its gallery."""
    run_dir = synthetic_run(tmp_path_factory.mktemp("large") / "run", LARGE, size="512*512")
    gallery_of(run_dir)
    return run_dir


def rendered(page: Page) -> Any:
    return page.eval("Array.from(document.querySelectorAll('.card'), c => c.dataset.model)")


@needs_chromium
async def test_a_large_gallery_shows_its_first_cards_and_more_as_it_scrolls(page, large_run):
    """At 20,000 images the page is small, shows a first screenful of cards, filters by list and by text,
    and adds cards as it is scrolled; its size and time to first cards are printed."""
    page_bytes, data_bytes = ((large_run / name).stat().st_size for name in (GALLERY_FILE, DATA_FILE))
    await page.open((large_run / GALLERY_FILE).as_uri(), timeout_s=60)
    first_ms = await first_cards_ms(page)
    print(
        f"\n{LARGE} images: gallery.html {page_bytes:,} B, {DATA_FILE} {data_bytes:,} B, first cards {first_ms:.0f} ms"
    )
    assert page_bytes < 20_000 and first_ms is not None
    first = await rendered(page)
    assert 0 < len(first) < 1000
    assert await page.eval("document.getElementById('shown').textContent") == f"{LARGE} of {LARGE} images shown"
    # Scrolling to the end of what is shown adds cards.
    await page.eval("window.scrollTo(0, document.body.scrollHeight)")
    await page.eval("new Promise((done) => setTimeout(done, 300))")
    assert len(first) < len(await rendered(page)) < LARGE
    # Few values: a list; thousands of values (subjects, seeds): a text search, and no grouping by them.
    controls = await page.eval(
        "Object.fromEntries(Array.from(document.querySelectorAll('[data-facet]'), c => [c.dataset.facet, c.tagName]))"
    )
    assert controls == {
        "model": "SELECT",
        "seed": "INPUT",
        "var.style": "SELECT",
        "var.subject": "INPUT",
        "prompt": "INPUT",
    }
    groups = await page.eval("Array.from(document.getElementById('group-by').options, o => o.value)")
    assert groups == ["", "model", "var.style", "prompt"]  # prompts repeat: each is asked of both models
    await page.open(
        (large_run / GALLERY_FILE).as_uri() + "#" + urlencode({"model": "wan2.6-t2i", "var.subject": "subject 3000"})
    )
    assert await rendered(page) == ["wan2.6-t2i"] * 3  # a subject has six images, three of each model
    assert await page.eval("document.getElementById('shown').textContent") == f"3 of {LARGE} images shown"


# --- without a browser -------------------------------------------------------------------------------


def gallery_cards(run_dir: Path) -> list[dict]:
    """The cards of a run's gallery as its data file holds them, tables resolved."""
    text = (run_dir / DATA_FILE).read_text(encoding="utf-8")
    prefix = "window.wanbatchGallery = "
    assert text.startswith(prefix) and text.endswith(";\n")
    data = json.loads(text[len(prefix) : -2])
    cards = []
    for row in data["cards"]:
        card = dict(zip(data["fields"], row, strict=True))
        values = {f["name"]: f["values"][i] for f, i in zip(data["facets"], card.pop("values"), strict=True)}
        card["vars"] = {name[4:]: value for name, value in values.items() if name.startswith("var.") and value}
        card |= {name: value for name, value in values.items() if not name.startswith("var.")}
        card["prompt"] = data["texts"][card["prompt"]]
        cards.append(card)
    return cards


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
    """An image deleted after it was saved still has its card, with no picture, and the page is written."""
    run_dir = Path(shutil.copytree(matrix_run, tmp_path / "run"))
    shutil.rmtree(run_dir / "thumbs")
    gone = metadata(run_dir)[0]
    (run_dir / gone["file_name"]).unlink()
    gallery_of(run_dir)
    cards = gallery_cards(run_dir)
    assert len(cards) == SAVED
    missing = [card for card in cards if card["thumb"] is None]
    assert len(missing) == 1 and missing[0]["file"] == gone["file_name"] and missing[0]["prompt"] == gone["prompt"]
    assert len(list((run_dir / "thumbs").rglob("*.jpg"))) == SAVED - 1


def test_values_are_given_back_exactly_by_the_data_file(matrix_run):
    """The page's markup holds no value of the manifest; its data file gives back each prompt and variable."""
    assert EVIL_PROMPT not in (matrix_run / GALLERY_FILE).read_text()
    cards = gallery_cards(matrix_run)
    assert sum(card["prompt"] == EVIL_PROMPT for card in cards) == 1
    evil = next(card for card in cards if card["prompt"] == EVIL_PROMPT)
    assert evil["vars"] == {}
    assert Counter(card["vars"].get("style") for card in cards) == {INK: 8, OIL: 8, None: 1}


def test_an_empty_run_gets_a_page_that_says_so(tmp_path):
    """A run folder with nothing saved yet gets a gallery that says so rather than failing."""
    with Ledger.open(tmp_path, clock=ScaledClock()) as ledger:
        path = asyncio.run(write_gallery(tmp_path, SqliteLedger(ledger)))
    assert gallery_cards(tmp_path) == [] and "No saved images yet." in path.read_text()


def test_a_small_image_is_its_own_thumbnail(tmp_path):
    """An image no larger than twice a thumbnail is shown as it is, with no thumbnail made;
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
    (card,) = gallery_cards(run_dir)
    assert card["file"] == row["file_name"] and card["thumb"] == 0
    assert not (run_dir / "thumbs").exists()
    (run_dir / row["file_name"]).unlink()
    gallery_of(run_dir)
    (card,) = gallery_cards(run_dir)
    assert card["thumb"] is None


def test_thumbnails_are_made_while_the_run_saves_its_images(tmp_path):
    """The run makes each item's thumbnails once its images are saved: the first is older than the last image."""
    run_dir = run_batch(
        tmp_path,
        """\
        name: gallery-while
        defaults: {model: wan2.2-t2i-flash, size: "1024*1024", n: 1, prompt_extend: false}
        prompts: [one, two, three, four, five, six, seven, eight, nine, ten]
        """,
        durations={"*": 20.0},
    )
    images = [run_dir / row["file_name"] for row in metadata(run_dir)]
    thumbs = [run_dir / thumb_name(row["file_name"]) for row in metadata(run_dir)]
    assert len(thumbs) == 10 and all(path.is_file() for path in thumbs)
    # Two tasks at a time, each 20 simulated seconds (0.1 s here): five waves of saves.
    assert min(p.stat().st_mtime_ns for p in thumbs) < max(p.stat().st_mtime_ns for p in images)


def test_a_full_thumbnail_queue_leaves_the_rest_to_the_end_of_the_run(tmp_path):
    """Past its queue's bound the thumbnailer takes no more (nothing waits on it); the gallery makes them."""
    run_dir = synthetic_run(tmp_path / "run", 6)
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        with Thumbnailer(run_dir, max_queued=0) as thumbs:
            for row in ledger.iter_items([ItemState.saved]):
                thumbs.item_done(Recorded(row=row, images=tuple(ledger.images_of(row.item_id))))
        assert thumbs.made == 0 and thumbs.left == 6 and not (run_dir / "thumbs").exists()
        asyncio.run(write_gallery(run_dir, SqliteLedger(ledger)))
    assert len(list((run_dir / "thumbs").rglob("*.jpg"))) == 6
    assert all(card["thumb"] == 1 for card in gallery_cards(run_dir))


def test_lists_only_for_few_values_and_grouping_by_prompt_only_where_prompts_repeat():
    """A facet of more than 50 values is searched, not listed nor grouped by; distinct prompts are no grouping."""
    cards = [
        Card(
            file_name=f"images/{i}.png",
            thumb=None,
            prompt=f"prompt {i}",
            actual_prompt=None,
            negative_prompt=None,
            model=("wan2.2-t2i-flash", "wan2.6-t2i")[i % 2],
            region="beijing",
            size="1024*1024",
            seed=i,
            variables={"light": ("dawn", "dusk")[i % 2]},
            item_id=f"{i:04x}",
            image_index=0,
            source="job.yaml:3",
        )
        for i in range(MAX_SELECT_VALUES + 1)
    ]
    data = gallery_data("run", cards)
    assert data["groupable"] == ["model", "var.light"] and data["defaultGroup"] == "model"
    assert {f["name"]: len(f["values"]) for f in data["facets"]}["seed"] == MAX_SELECT_VALUES + 1
