"""The gallery's data: one card per saved image, its facets, and the compact form the page loads.

The page loads its data from ``gallery-data.js``, a script that assigns one object (browsers refuse
``fetch()`` of ``file://`` URLs; a script works there and from a bucket alike). Cards are arrays, not
objects, and every value that repeats (a facet's values, prompts, sources) is written once in a table the
cards point into, so that 100,000 cards stay a few megabytes.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.outputs.gallery.thumbs import picture, stored_picture

__all__ = ["CARD_FIELDS", "FIXED_FACETS", "MAX_SELECT_VALUES", "Card", "cards_of", "gallery_data"]

#: The facets every card has, in the order the filters show them; manifest variables follow as ``var.NAME``.
FIXED_FACETS = ("model", "size", "seed", "region")
#: A facet with more distinct values than this is searched by text: a list longer than this is not read.
MAX_SELECT_VALUES = 50
#: The positions in a card's array, as the page's script reads them.
CARD_FIELDS = ("file", "thumb", "values", "prompt", "actual", "negative", "source", "item", "index")
#: ``thumb``: where the card's picture is (its thumbnail under thumbs/, the image itself, or none).
THUMB_MADE, THUMB_SELF, THUMB_NONE = 1, 0, None


@dataclass(frozen=True, slots=True, kw_only=True)
class Card:
    """One saved image as the page shows it."""

    file_name: str  #: relative to the run folder
    thumb: str | None  #: relative to the run folder; None when the image could not be read
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


async def cards_of(run_dir: Path, ledger: RunLedger, *, images_here: bool = True) -> list[Card]:
    """A card for every saved image, its thumbnail made if missing, in the order the page shows them
    (``images_here`` False: the images are in a store, with the thumbnails made as they were saved)."""
    # The ledger is read first, here: the few thumbnails a run left are then made on every core.
    saved = [pair async for pair in ledger.iter_saved()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        cards = list(pool.map(lambda pair: _card(run_dir, *pair, images_here=images_here), saved))
    names = _facet_names(cards)
    cards.sort(key=lambda card: _order(card, names))
    return cards


def _card(run_dir: Path, image: ImageRow, item: ItemRow, *, images_here: bool) -> Card:
    file_name = image.file_name or ""
    request = item.request
    try:
        thumb: str | None = (
            picture(run_dir, file_name, request["size"]) if images_here else stored_picture(file_name, request["size"])
        )
    except (OSError, UnidentifiedImageError):
        # Deleted or damaged since it was saved: the card says so instead of the page failing.
        thumb = None
    return Card(
        file_name=file_name,
        thumb=thumb,
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


def _facet_names(cards: list[Card]) -> list[str]:
    return [*FIXED_FACETS, *(f"var.{name}" for name in sorted({k for card in cards for k in card.variables}))]


def _value_order(value: str) -> tuple:
    width, _, height = value.partition("*")
    if width.isdigit() and height.isdigit():
        return (0, int(width) * int(height), int(width), value)
    if value.lstrip("-").isdigit():
        return (0, int(value), 0, value)
    return (1, 0, 0, value)


def _order(card: Card, names: list[str]) -> tuple:
    """Variables, prompt, size, seed, model: the same cell of a matrix has the same place in every group."""
    variables = tuple(_value_order(card.facet(name)) for name in names if name.startswith("var."))
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


class _Table:
    """Strings written once, pointed at by position."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def __call__(self, value: str | None) -> int | None:
        if value is None:
            return None
        return self.index.setdefault(value, len(self.index))

    @property
    def values(self) -> list[str]:
        return list(self.index)


def gallery_data(title: str, cards: list[Card]) -> dict[str, Any]:
    """What ``gallery-data.js`` assigns: facets with their values and counts, text tables, and the cards."""
    facets = []
    for name in _facet_names(cards):
        counts = Counter(card.facet(name) for card in cards)
        values = sorted(counts, key=_value_order)
        facets.append({"name": name, "values": values, "counts": [counts[v] for v in values]})
    positions = [{value: i for i, value in enumerate(facet["values"])} for facet in facets]
    texts = _Table()
    rows = []
    for card in cards:
        thumb = THUMB_NONE if card.thumb is None else THUMB_SELF if card.thumb == card.file_name else THUMB_MADE
        values = [where[card.facet(facet["name"])] for facet, where in zip(facets, positions, strict=True)]
        prompt, negative, source = texts(card.prompt), texts(card.negative_prompt), texts(card.source)
        actual = card.actual_prompt if card.actual_prompt and card.actual_prompt != card.prompt else None
        rows.append([card.file_name, thumb, values, prompt, actual, negative, source, card.item_id, card.image_index])
    prompts = len({card.prompt for card in cards})
    groupable = [f["name"] for f in facets if 1 < len(f["values"]) <= MAX_SELECT_VALUES]
    # Grouping by prompt helps only where prompts repeat (seeds or models compared); else each group is one card.
    if 1 < prompts < len(cards):
        groupable.append("prompt")
    return {
        "title": title,
        "requests": len({card.item_id for card in cards}),
        "prompts": prompts,
        "facets": facets,
        "maxSelect": MAX_SELECT_VALUES,
        "groupable": groupable,
        "defaultGroup": next((name for name in ("model", *groupable) if name in groupable), ""),
        "texts": texts.values,
        "fields": list(CARD_FIELDS),
        "cards": rows,
    }
