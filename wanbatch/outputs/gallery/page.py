"""``gallery.html``: a small page that loads ``gallery-data.js`` and renders cards as they are scrolled to.

The page holds no card: its script builds the filters and the cards from the data, a screenful at a
time, and more as the reader nears the end of what is shown, so a run of 100,000 images opens as fast as
one of ten. Facets with few values get a list (with counts), the others a text search; the state of the
filters lives in the URL's fragment (``gallery.html#model=wan2.6-t2i&group=size``), so a view can be
bookmarked or shared with the folder. Every link is relative, so the folder works as well from a bucket.

Nothing from a manifest or the service is parsed as markup: the script sets text and attributes only,
and the Content-Security-Policy runs no script but this one and the folder's data file.
"""

from __future__ import annotations

import base64
import hashlib
import html
from string import Template

from wanbatch.outputs.gallery.thumbs import THUMB_SIDE_PX, THUMBS_DIR

__all__ = ["DATA_FILE", "GALLERY_FILE", "page"]

GALLERY_FILE = "gallery.html"
DATA_FILE = "gallery-data.js"
#: The global the data file assigns.
DATA_GLOBAL = "wanbatchGallery"
#: Cards added at a time: more than a tall screen holds, few enough to build in a frame or two.
CHUNK_CARDS = 120


def page(title: str, *, images: int, requests: int) -> str:
    """The page of a run folder named ``title`` holding ``images`` saved images from ``requests`` requests."""
    summary = f"{images} image{'s' * (images != 1)} from {requests} request{'s' * (requests != 1)}"
    empty = '<p class="empty">No saved images yet.</p>' if not images else ""
    # 'self' does not cover file: pages in every browser, hence file: beside it.
    csp = (
        "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline';"
        f" script-src 'self' file: 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
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
<label>group by <select id="group-by"><option value="">nothing</option></select></label>
<button type="button" id="show-all">show all</button>
<output id="shown"></output>
</form>
</header>
<main id="gallery">{empty}</main>
<div id="more"></div>
<script src="{DATA_FILE}"></script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


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
select, button, input { font: inherit; color: var(--fg); background: var(--card); border: 1px solid var(--line);
  border-radius: 6px; padding: 3px 6px; max-width: 22em; }
input { width: 12em; }
button { cursor: pointer; }
output { margin-left: auto; color: var(--muted); }
main { padding: 4px 20px 40px; }
#more { height: 1px; }
.group h2 { font-size: 15px; margin: 18px 0 10px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 188px); gap: 12px; }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
  content-visibility: auto; contain-intrinsic-size: auto 188px auto 300px; }
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

# Reads the data file's values and writes only text and attributes: nothing from a prompt is parsed as markup.
_SCRIPT = Template(
    """
"use strict";
(() => {
  const data = window.$global_;
  const main = document.getElementById("gallery");
  const form = document.getElementById("filters");
  const groupBy = document.getElementById("group-by");
  const shown = document.getElementById("shown");
  const more = document.getElementById("more");
  if (!data) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "$data is missing or unreadable: keep it beside this page.";
    main.replaceChildren(p);
    return;
  }
  const at = Object.fromEntries(data.fields.map((name, i) => [name, i]));
  const cards = data.cards, facets = data.facets, texts = data.texts;
  const byName = new Map(facets.map((facet, f) => [facet.name, f]));
  const label = (name) => (name.startsWith("var.") ? name.slice(4) : name);
  const valueOf = (card, f) => facets[f].values[card[at.values][f]];
  const promptOf = (card) => texts[card[at.prompt]];
  const hues = facets[byName.get("model")].values.map((_, i, all) => Math.round(360 * i / all.length + 210) % 360);

  // One control per facet that tells images apart: a list when its values are few, else a text search.
  const controls = [];
  const anchor = groupBy.closest("label");
  function control(name, values, counts) {
    const wrap = document.createElement("label");
    wrap.append(label(name) + " ");
    let input;
    if (values) {
      input = document.createElement("select");
      input.add(new Option("all (" + cards.length + ")", ""));
      values.forEach((value, i) => input.add(new Option((value || "—") + " (" + counts[i] + ")", value)));
    } else {
      input = document.createElement("input");
      input.type = "search";
      input.placeholder = "contains…";
    }
    input.dataset.facet = name;
    wrap.append(input);
    form.insertBefore(wrap, anchor);
    controls.push(input);
  }
  for (const facet of facets) {
    if (facet.values.length < 2) continue;
    const few = facet.values.length <= data.maxSelect;
    control(facet.name, few ? facet.values : null, facet.counts);
  }
  if (data.prompts > 1) control("prompt", null, null);
  for (const name of data.groupable) groupBy.add(new Option(label(name), name));

  const lowered = new Map();
  const lower = (text) => {
    let low = lowered.get(text);
    if (low === undefined) lowered.set(text, (low = text.toLowerCase()));
    return low;
  };
  function matcher(input) {
    const name = input.dataset.facet, wanted = input.value;
    if (input.tagName === "SELECT") {
      const index = facets[byName.get(name)].values.indexOf(wanted), f = byName.get(name);
      return (card) => card[at.values][f] === index;
    }
    const needle = wanted.toLowerCase();
    if (name === "prompt")
      return (card) => lower(promptOf(card)).includes(needle) || lower(card[at.actual] || "").includes(needle);
    const f = byName.get(name);
    return (card) => lower(valueOf(card, f)).includes(needle);
  }

  // The fragment holds the view: a facet named there filters by its value; "group" names the grouping.
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const input of controls) {
      const wanted = params.get(input.dataset.facet);
      input.value = wanted === null ? "" : wanted;
      if (input.tagName === "SELECT" && input.selectedIndex < 0) input.value = "";
    }
    groupBy.value = params.has("group") ? params.get("group") : data.defaultGroup;
    if (groupBy.selectedIndex < 0) groupBy.value = data.defaultGroup;
  }

  function writeHash() {
    const params = new URLSearchParams();
    for (const input of controls) if (input.value !== "") params.set(input.dataset.facet, input.value);
    if (groupBy.value !== data.defaultGroup) params.set("group", groupBy.value);
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    render();
  }

  // The groups of the cards that pass every filter, in the order of the grouping facet's values.
  function groups() {
    const tests = controls.filter((input) => input.value !== "").map(matcher);
    const name = groupBy.value, f = byName.get(name);
    const keyOf =
      name === "prompt" ? (card) => card[at.prompt] : f === undefined ? () => 0 : (card) => card[at.values][f];
    const found = new Map(f === undefined ? [] : facets[f].values.map((_, i) => [i, []]));
    let count = 0;
    for (const card of cards) {
      if (!tests.every((test) => test(card))) continue;
      const key = keyOf(card);
      if (!found.has(key)) found.set(key, []);
      found.get(key).push(card);
      count += 1;
    }
    const title = name === "prompt" ? (key) => texts[key] : f === undefined ? null : (key) => facets[f].values[key];
    const list = [];
    for (const [key, members] of found) if (members.length) list.push({ name, value: title && title(key), members });
    return { list, count };
  }

  let view = { list: [], group: 0, offset: 0 };

  function render() {
    const { list, count } = groups();
    view = { list, group: 0, offset: 0, grid: null };
    main.replaceChildren();
    shown.textContent = count + " of " + cards.length + " images shown";
    fill();
  }

  // Adds cards until the end of what is shown is out of sight, then waits for the reader to scroll.
  function fill() {
    let budget = $chunk;
    while (budget > 0 && view.group < view.list.length) {
      const group = view.list[view.group];
      if (view.offset === 0) view.grid = section(group);
      const slice = group.members.slice(view.offset, view.offset + budget);
      view.grid.append(...slice.map(cardElement));
      budget -= slice.length;
      view.offset += slice.length;
      if (view.offset >= group.members.length) {
        view.group += 1;
        view.offset = 0;
      }
    }
    if (view.group < view.list.length && more.getBoundingClientRect().top < innerHeight * 2)
      requestAnimationFrame(fill);
  }
  new IntersectionObserver((entries) => entries.some((e) => e.isIntersecting) && fill(), {
    rootMargin: "0px 0px 100% 0px",
  }).observe(more);

  function section(group) {
    const element = document.createElement("section");
    element.className = "group";
    if (group.value !== null) {
      const heading = document.createElement("h2");
      const count = document.createElement("small");
      heading.textContent = label(group.name) + ": " + (group.value === "" ? "—" : group.value);
      count.textContent = group.members.length + (group.members.length === 1 ? " image" : " images");
      heading.append(count);
      element.append(heading);
      element.dataset.group = group.value;
    }
    const grid = document.createElement("div");
    grid.className = "grid";
    element.append(grid);
    main.append(element);
    return grid;
  }

  const href = (path) => path.split("/").map(encodeURIComponent).join("/");
  const thumbOf = (file) => "$thumbs/" + file.replace(/^images\\//, "").replace(/\\.[^./]*$$/, "") + ".jpg";
  const add = (parent, tag, className, text) => {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    parent.append(element);
    return element;
  };

  function cardElement(card) {
    const figure = document.createElement("figure");
    figure.className = "card";
    const vars = {};
    facets.forEach((facet, f) => {
      if (facet.name.startsWith("var.") && valueOf(card, f) !== "") vars[facet.name.slice(4)] = valueOf(card, f);
      else if (!facet.name.startsWith("var.")) figure.dataset[facet.name] = valueOf(card, f);
    });
    figure.dataset.vars = JSON.stringify(vars);
    const file = card[at.file], prompt = promptOf(card), size = figure.dataset.size;
    const link = add(figure, "a");
    link.href = href(file);
    link.title = "open " + file;
    if (card[at.thumb] === null) add(link, "span", "missing", "image missing or unreadable");
    else {
      const img = add(link, "img");
      const [width, height] = size.split("*").map(Number);
      const scale = Math.min(1, $side / Math.max(width, height, 1));
      img.width = Math.max(1, Math.round(width * scale));
      img.height = Math.max(1, Math.round(height * scale));
      img.alt = prompt;
      img.loading = "lazy";
      img.decoding = "async";
      img.src = href(card[at.thumb] ? thumbOf(file) : file);
    }
    const caption = add(figure, "figcaption");
    const tags = add(caption, "div", "tags");
    const model = add(tags, "span", "tag model", figure.dataset.model);
    model.style.setProperty("--hue", hues[card[at.values][byName.get("model")]]);
    add(tags, "span", "tag", size);
    add(tags, "span", "tag", figure.dataset.seed === "" ? "seed ?" : "seed " + figure.dataset.seed);
    const names = Object.keys(vars).sort();
    if (names.length) {
      const box = add(caption, "div", "vars");
      for (const name of names) {
        const tag = add(box, "span", "var");
        add(tag, "b", "", name);
        tag.append(" " + vars[name]);
      }
    }
    add(caption, "p", "prompt", prompt).title = prompt;
    if (card[at.actual]) add(caption, "p", "actual", "↳ " + card[at.actual]).title = card[at.actual];
    const negative = card[at.negative] === null ? "" : texts[card[at.negative]];
    if (negative) add(caption, "p", "negative", "not: " + negative).title = negative;
    add(caption, "p", "source", texts[card[at.source]] + " · " + card[at.item] + " #" + card[at.index]);
    return figure;
  }

  form.addEventListener("submit", (event) => event.preventDefault());  // Enter in a search box
  form.addEventListener("change", writeHash);
  form.addEventListener("input", (event) => event.target.type === "search" && writeHash());
  document.getElementById("show-all").addEventListener("click", () => {
    for (const input of controls) input.value = "";
    writeHash();
  });
  window.addEventListener("hashchange", () => (readHash(), render()));
  readHash();
  render();
  // Read by the tests and the benchmark: how long after navigation the first cards were in the page.
  performance.mark("wanbatch:first-cards");
})();
"""
).substitute(global_=DATA_GLOBAL, data=DATA_FILE, chunk=CHUNK_CARDS, side=THUMB_SIDE_PX, thumbs=THUMBS_DIR)
#: The page's policy lets this one script run, by its hash.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
