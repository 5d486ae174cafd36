"""The gallery: ``gallery.html`` in the run folder, to compare a run's images by eye.

One static file that needs nothing but the run folder: inline style and script,
no fonts or libraries fetched (its Content-Security-Policy forbids any fetch but
the folder's own images). Each saved image has a card: a thumbnail made once
with Pillow into ``thumbs/`` (an image of at most ``SMALL_IMAGE_PX`` a side is
shown as it is), linking to the full image, its model, size, seed,
manifest variables and prompt. The page filters by any of those and groups by
one of them; cards keep one order (variables, prompt, size, seed, model) in
every group, so the groups of a matrix experiment line up cell by cell.

Every value that came from a manifest or the service is HTML-escaped where it
is written, and the script only reads values back from data attributes and sets
text, never markup: a prompt may hold anything. The state of the filters lives
in the URL's fragment (``gallery.html#model=wan2.6-t2i&group=size``), so a view
can be bookmarked or shared with the folder.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from .ledger import ImageRow, ItemRow, Ledger
from .outputs import saved_images

__all__ = ["GALLERY_FILE", "THUMBS_DIR", "THUMB_SIDE_PX", "thumb_name", "write_gallery"]

GALLERY_FILE = "gallery.html"
THUMBS_DIR = "thumbs"
#: The long side of a thumbnail: sharp in a 188 px card on a 1.2x screen, ~10 kB as a JPEG.
THUMB_SIDE_PX = 256
#: An image whose long side is at most this is its own thumbnail: shrinking it would save the page little,
#: and decoding, resizing and encoding it would cost more CPU than the image's whole way through the engine.
SMALL_IMAGE_PX = 2 * THUMB_SIDE_PX
THUMB_JPEG_QUALITY = 85
#: The facets every card has, in the order the filters show them; manifest variables follow as ``var.NAME``.
FIXED_FACETS = ("model", "size", "seed", "region")


@dataclass(frozen=True, slots=True, kw_only=True)
class Card:
    """One saved image as the page shows it."""

    file_name: str  #: relative to the run folder
    thumb: str | None  #: relative to the run folder; None when the image could not be read
    thumb_size: tuple[int, int]
    prompt: str
    actual_prompt: str | None
    negative_prompt: str | None
    model: str
    region: str
    size: str
    seed: int | None
    variables: dict[str, str]
    item_id: str
    image_index: int
    source: str

    def facet(self, name: str) -> str:
        if name.startswith("var."):
            return str(self.variables.get(name[4:], ""))
        value = getattr(self, name)
        return "" if value is None else str(value)


def write_gallery(run_dir: Path, ledger: Ledger) -> Path:
    """Write ``run_dir/gallery.html`` for every saved image (thumbnails made where missing); return its path."""
    run_dir = Path(run_dir)
    # Thumbnails are made on every core: Pillow lets go of the GIL while it decodes, resizes and encodes.
    # The ledger is read in this thread only (map takes the rows here, as it submits them).
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        cards = list(pool.map(lambda pair: _card(run_dir, *pair), saved_images(ledger)))
    facets = _facets(cards)
    cards.sort(key=lambda card: _order(card, facets))
    path = run_dir / GALLERY_FILE
    _write_atomic(path, _page(run_dir.name, cards, facets).encode())
    return path


def _card(run_dir: Path, image: ImageRow, item: ItemRow) -> Card:
    file_name = image.file_name or ""
    try:
        thumb, thumb_size = _picture(run_dir, file_name, item.request["size"])
    except (OSError, UnidentifiedImageError):
        # Deleted or damaged since it was saved: the card says so instead of the page failing.
        thumb, thumb_size = None, (0, 0)
    request = item.request
    return Card(
        file_name=file_name,
        thumb=thumb,
        thumb_size=thumb_size,
        prompt=request["prompt"],
        actual_prompt=image.actual_prompt,
        negative_prompt=request.get("negative_prompt"),
        model=item.model,
        region=item.region,
        size=request["size"],
        seed=image.seed,
        variables={str(k): str(v) for k, v in item.variables.items()},
        item_id=item.item_id,
        image_index=image.image_index,
        source=item.source,
    )


def thumb_name(file_name: str) -> str:
    """Where an image's thumbnail goes: its path under ``images/`` mirrored under ``thumbs/``, as a JPEG."""
    path = PurePosixPath(file_name)
    if path.parts[:1] == ("images",):
        path = path.relative_to("images")
    return str(PurePosixPath(THUMBS_DIR) / path.with_suffix(".jpg"))


def _picture(run_dir: Path, file_name: str, size: str) -> tuple[str, tuple[int, int]]:
    """What a card shows and at what size: the image itself when small, else its thumbnail (made if missing).

    ``size`` is the one asked for ("W*H"): the downloader saved the image only once it had checked it.
    """
    source = run_dir / file_name
    width, height = (int(side) for side in size.split("*"))
    if max(width, height) <= SMALL_IMAGE_PX:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is gone")
        scale = min(1.0, THUMB_SIDE_PX / max(width, height, 1))
        return file_name, (max(1, round(width * scale)), max(1, round(height * scale)))
    thumb = thumb_name(file_name)
    return thumb, _thumbnail(source, run_dir / thumb)


def _thumbnail(source: Path, target: Path) -> tuple[int, int]:
    """Make ``target`` from ``source`` unless it is already newer; return the thumbnail's size."""
    if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        with Image.open(target) as thumb:
            return thumb.size
    with Image.open(source) as img:
        # The service's PNGs may be palette images, which Pillow would shrink by nearest neighbour.
        rgb = img.convert("RGB")
    rgb.thumbnail((THUMB_SIDE_PX, THUMB_SIDE_PX), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    rgb.save(tmp, "JPEG", quality=THUMB_JPEG_QUALITY, optimize=True)
    os.replace(tmp, target)
    return rgb.size


def _facets(cards: list[Card]) -> dict[str, list[str]]:
    """Every facet with its distinct values in display order (numbers and sizes by magnitude)."""
    names = [*FIXED_FACETS, *(f"var.{name}" for name in sorted({k for card in cards for k in card.variables}))]
    return {name: sorted({card.facet(name) for card in cards}, key=_value_order) for name in names}


def _value_order(value: str) -> tuple:
    width, _, height = value.partition("*")
    if width.isdigit() and height.isdigit():
        return (0, int(width) * int(height), int(width), value)
    if value.lstrip("-").isdigit():
        return (0, int(value), 0, value)
    return (1, 0, 0, value)


def _order(card: Card, facets: dict[str, list[str]]) -> tuple:
    """Variables, prompt, size, seed, model: the same cell of a matrix has the same place in every group."""
    variables = tuple(_value_order(card.facet(name)) for name in facets if name.startswith("var."))
    return (
        variables,
        card.prompt,
        _value_order(card.size),
        card.seed if card.seed is not None else -1,
        card.model,
        card.region,
        card.item_id,
        card.image_index,
    )


# ── the page ──────────────────────────────────────────────────────────────────────────────────────


def _e(value: Any) -> str:
    """Escape for HTML text and for attribute values in double quotes."""
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, cards: list[Card], facets: dict[str, list[str]]) -> str:
    counts = {name: Counter(card.facet(name) for card in cards) for name in facets}
    # Only facets that tell images apart get a filter; the others are the same for every image.
    varying = [name for name, values in facets.items() if len(values) > 1]
    default_group = next((name for name in ("model", *varying) if name in varying), "")
    hues = {model: hue for model, hue in zip(facets["model"], _hues(len(facets["model"])), strict=True)}
    requests = len({card.item_id for card in cards})
    summary = f"{len(cards)} image{'s' * (len(cards) != 1)} from {requests} request{'s' * (requests != 1)}"
    filters = "".join(_filter(name, facets[name], counts[name]) for name in varying)
    groups = "".join(
        f'<option value="{_e(name)}"{" selected" * (name == default_group)}>{_e(_label(name))}</option>'
        for name in varying
    )
    body = "".join(_card_html(card, hues) for card in cards) or '<p class="empty">No saved images yet.</p>'
    csp = (
        "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline';"
        f" script-src 'sha256-{base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()}';"
        " base-uri 'none'; form-action 'none'"
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{_e(title)} · gallery</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>{_e(title)} <small>{_e(summary)}</small></h1>
<form id="filters" autocomplete="off">
{filters}<label>group by <select id="group-by" data-default="{_e(default_group)}">
<option value="">nothing</option>{groups}</select></label>
<button type="button" id="show-all">show all</button>
<output id="shown">{len(cards)} of {len(cards)} images shown</output>
</form>
</header>
<main id="gallery"><section class="group"><div class="grid">
{body}
</div></section></main>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _label(facet: str) -> str:
    return facet[4:] if facet.startswith("var.") else facet


def _filter(name: str, values: list[str], counts: Counter) -> str:
    options = "".join(f'<option value="{_e(v)}">{_e(v or "—")} ({counts[v]})</option>' for v in values)
    return (
        f'<label>{_e(_label(name))} <select data-facet="{_e(name)}">'
        f'<option value="">all ({counts.total()})</option>{options}</select></label>\n'
    )


def _hues(count: int) -> list[int]:
    """Hues spread around the wheel, one per model, so a model's tag reads the same in every group."""
    return [round(360 * i / max(count, 1) + 210) % 360 for i in range(count)]


def _card_html(card: Card, hues: dict[str, int]) -> str:
    href = _e(quote(card.file_name))
    if card.thumb is None:
        picture = '<span class="missing">image missing or unreadable</span>'
    else:
        width, height = card.thumb_size
        picture = (
            f'<img src="{_e(quote(card.thumb))}" width="{width}" height="{height}" alt="{_e(card.prompt)}"'
            ' loading="lazy" decoding="async">'
        )
    seed = "seed ?" if card.seed is None else f"seed {card.seed}"
    variables = "".join(
        f'<span class="var"><b>{_e(name)}</b> {_e(value)}</span>' for name, value in sorted(card.variables.items())
    )
    extra = ""
    if card.actual_prompt and card.actual_prompt != card.prompt:
        extra += f'<p class="actual" title="{_e(card.actual_prompt)}">↳ {_e(card.actual_prompt)}</p>'
    if card.negative_prompt:
        extra += f'<p class="negative" title="{_e(card.negative_prompt)}">not: {_e(card.negative_prompt)}</p>'
    variables = f'<div class="vars">{variables}</div>' if variables else ""
    hue = hues.get(card.model, 0)
    return (
        f'<figure class="card" data-model="{_e(card.model)}" data-size="{_e(card.size)}"'
        f' data-seed="{_e(card.facet("seed"))}" data-region="{_e(card.region)}"'
        f' data-vars="{_e(json.dumps(card.variables, ensure_ascii=False, sort_keys=True))}">'
        f'<a href="{href}" title="open {_e(card.file_name)}">{picture}</a><figcaption>'
        f'<div class="tags"><span class="tag model" style="--hue: {hue}">{_e(card.model)}</span>'
        f'<span class="tag">{_e(card.size)}</span><span class="tag">{_e(seed)}</span></div>'
        f'{variables}<p class="prompt" title="{_e(card.prompt)}">{_e(card.prompt)}</p>{extra}'
        f'<p class="source">{_e(card.source)} · {_e(card.item_id)} #{card.image_index}</p>'
        "</figcaption></figure>\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_STYLE = """
:root { color-scheme: light dark; --bg: #f5f5f2; --fg: #1c1c1e; --muted: #6a6a70; --card: #fff; --line: #dcdcd6;
  --tile: #e8e8e3; --tag-l: 90%; --tag-fg-l: 25%; }
@media (prefers-color-scheme: dark) { :root { --bg: #131315; --fg: #ececef; --muted: #9a9aa3; --card: #1d1d21;
  --line: #2e2e35; --tile: #26262b; --tag-l: 28%; --tag-fg-l: 88%; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
  color: var(--fg); }
header { position: sticky; top: 0; z-index: 1; background: var(--bg); border-bottom: 1px solid var(--line);
  padding: 12px 20px; }
h1 { font-size: 18px; margin: 0 0 10px; }
h1 small, .group h2 small { color: var(--muted); font-weight: normal; margin-left: 8px; font-size: 14px; }
form { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; }
label { display: inline-flex; gap: 6px; align-items: center; color: var(--muted); }
select, button { font: inherit; color: var(--fg); background: var(--card); border: 1px solid var(--line);
  border-radius: 6px; padding: 3px 6px; max-width: 22em; }
button { cursor: pointer; }
output { margin-left: auto; color: var(--muted); }
main { padding: 4px 20px 40px; }
.group h2 { font-size: 15px; margin: 18px 0 10px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 188px); gap: 12px; }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.card > a { display: flex; align-items: center; justify-content: center; height: 188px; background: var(--tile); }
.card img { display: block; max-width: 100%; max-height: 100%; width: auto; height: auto; }
.missing { color: var(--muted); padding: 12px; text-align: center; }
figcaption { display: grid; gap: 5px; padding: 8px 10px 10px; }
.tags, .vars { display: flex; flex-wrap: wrap; gap: 4px; }
.tag, .var { font-size: 12px; padding: 1px 6px; border-radius: 4px; background: var(--tile); }
.tag.model { background: hsl(var(--hue) 70% var(--tag-l)); color: hsl(var(--hue) 60% var(--tag-fg-l)); }
.var b { font-weight: 600; color: var(--muted); }
.card p { margin: 0; overflow-wrap: anywhere; }
.prompt { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
.actual, .negative { font-size: 12px; color: var(--muted); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.source { font-size: 11px; color: var(--muted); }
.empty { color: var(--muted); }
"""

# Reads every value from data attributes and writes only text: nothing from a prompt is parsed as markup.
_SCRIPT = """
"use strict";
(() => {
  const form = document.getElementById("filters");
  const main = document.getElementById("gallery");
  const cards = Array.from(main.querySelectorAll(".card"));
  const facets = Array.from(form.querySelectorAll("select[data-facet]"));
  const groupBy = document.getElementById("group-by");
  const shown = document.getElementById("shown");
  const vars = new Map(cards.map((card) => [card, JSON.parse(card.dataset.vars)]));
  const valueOf = (card, facet) =>
    facet.startsWith("var.") ? vars.get(card)[facet.slice(4)] ?? "" : card.dataset[facet] ?? "";
  const label = (facet) => (facet.startsWith("var.") ? facet.slice(4) : facet);

  // The fragment holds the view: a facet named there filters by its value; "group" names the grouping.
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const group = params.has("group") ? params.get("group") : groupBy.dataset.default;
    return { params, group };
  }

  function writeHash() {
    const params = new URLSearchParams();
    for (const select of facets) if (select.selectedIndex > 0) params.set(select.dataset.facet, select.value);
    if (groupBy.value !== groupBy.dataset.default) params.set("group", groupBy.value);
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    render(readHash());
  }

  function render({ params, group }) {
    for (const select of facets) {
      const wanted = params.get(select.dataset.facet);
      const index = Array.from(select.options).findIndex((option, i) => i > 0 && option.value === wanted);
      select.selectedIndex = wanted === null ? 0 : Math.max(index, 0);
    }
    groupBy.value = group;
    if (groupBy.selectedIndex < 0) groupBy.value = groupBy.dataset.default;
    const active = facets.filter((select) => select.selectedIndex > 0);
    let count = 0;
    for (const card of cards) {
      card.hidden = !active.every((select) => valueOf(card, select.dataset.facet) === select.value);
      count += card.hidden ? 0 : 1;
    }
    regroup(groupBy.value);
    shown.textContent = count + " of " + cards.length + " images shown";
  }

  function regroup(facet) {
    const select = facets.find((s) => s.dataset.facet === facet);
    const order = select ? Array.from(select.options).slice(1).map((option) => option.value) : [""];
    const groups = new Map(order.map((value) => [value, []]));
    for (const card of cards) {
      const value = select ? valueOf(card, facet) : "";
      if (!groups.has(value)) groups.set(value, []);
      groups.get(value).push(card);
    }
    const sections = [];
    for (const [value, members] of groups) {
      if (members.length === 0) continue;
      const section = document.createElement("section");
      section.className = "group";
      const visible = members.filter((card) => !card.hidden).length;
      if (select) {
        const heading = document.createElement("h2");
        const count = document.createElement("small");
        heading.textContent = label(facet) + ": " + (value === "" ? "—" : value);
        count.textContent = visible + (visible === 1 ? " image" : " images");
        heading.append(count);
        section.append(heading);
      }
      const grid = document.createElement("div");
      grid.className = "grid";
      grid.append(...members);
      section.append(grid);
      section.hidden = visible === 0;
      section.dataset.group = value;
      sections.push(section);
    }
    if (sections.length) main.replaceChildren(...sections);
  }

  form.addEventListener("change", writeHash);
  document.getElementById("show-all").addEventListener("click", () => {
    for (const select of facets) select.selectedIndex = 0;
    writeHash();
  });
  window.addEventListener("hashchange", () => render(readHash()));
  render(readHash());
})();
"""
