"""What the ledger takes in and gives back: the row and record types, JSON columns parsed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["AddResult", "ImageRecord", "ImageRow", "ItemLike", "ItemRow", "Recorded"]


class ItemLike(Protocol):
    """What the ledger reads from a manifest item (``wanbatch.manifest.Item``)."""

    item_id: str
    replica: int
    region: str
    model: str
    n: int
    variables: Mapping[str, Any]
    source: str
    entry: str
    output: str | None

    def request(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AddResult:
    added: int  #: items new to the ledger, now planned
    existing: int  #: items it already had, left in whatever state they are


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRecord:
    """One entry of a task's results, as the tracker saw it. No ``url`` means the service reported it failed."""

    index: int
    state: ImageState | None = None  #: pending or failed; by default from whether there is a ``url``
    url: str | None = None
    deadline_ms: int | None = None  #: when the URL dies
    seed: int | None = None
    actual_prompt: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemRow:
    """An item as the ledger holds it, JSON columns parsed."""

    seq: int
    item_id: str
    state: ItemState
    replica: int
    region: str
    model: str
    n_images: int
    request: dict[str, Any]
    source: str  #: "file:line"
    entry: str  #: field path in the manifest
    variables: dict[str, Any]
    output: str | None  #: the output file-name pattern, if the manifest gives one
    price_per_image: float
    currency: str
    task_id: str | None
    request_ids: tuple[str, ...]
    task_status: str | None
    error_code: str | None
    error_message: str | None
    attempts: int
    actual_prompts: tuple[str, ...]
    images_generated: int
    cost: float  #: images generated × price: what the service bills
    planned_ms: int
    submit_started_ms: int | None
    submitted_ms: int | None
    ended_ms: int | None
    updated_ms: int
    first_seen_run: int
    last_seen_run: int
    endpoint: str | None = None  #: where the latest attempt went: "async" (a task) or "sync" (no task to find)
    #: where else the manifest asks for this very request (``file:line``, up to ``MORE_SOURCES_KEPT``)
    more_sources: tuple[str, ...] = ()
    #: the account (of a pool) whose key made the latest attempt, set with the move to submitting; '' for the
    #: environment's key of the region (a run without a pool)
    account: str = ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ItemRow:
        # Every stage reads rows: the names are listed once, and the JSON columns' usual empty values are
        # not parsed at all.
        values = {name: row[name] for name in _ITEM_FIELDS}
        values["state"] = ItemState(values["state"])
        values["request"] = json.loads(values["request"])
        values["variables"] = {} if values["variables"] == "{}" else json.loads(values["variables"])
        values["request_ids"] = _json_tuple(values["request_ids"])
        values["actual_prompts"] = _json_tuple(values["actual_prompts"])
        values["more_sources"] = _json_tuple(values["more_sources"])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRow:
    item_id: str
    image_index: int
    state: ImageState
    url: str | None
    deadline_ms: int | None
    seed: int | None
    actual_prompt: str | None
    file_name: str | None  #: relative to the run folder
    sha256: str | None
    size_bytes: int | None
    error_code: str | None
    error_message: str | None
    saved_ms: int | None
    updated_ms: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ImageRow:
        values = {name: row[name] for name in _IMAGE_FIELDS}
        values["state"] = ImageState(values["state"])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recorded:
    """What recording a finished task's results wrote: its item's new row and every image it now has."""

    row: ItemRow
    images: tuple[ImageRow, ...]  #: by index

    @property
    def pending(self) -> tuple[ImageRow, ...]:
        """The images to download: those with a URL and not yet saved."""
        return tuple(image for image in self.images if image.state is ImageState.pending)


_ITEM_FIELDS = tuple(f.name for f in fields(ItemRow))
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRow))


def _json_tuple(text: str) -> tuple[Any, ...]:
    return () if text == "[]" else tuple(json.loads(text))
