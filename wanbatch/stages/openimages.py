"""The downloader's open images, per item: which are queued, and each item's row while any of its images is open.

An image is queued once while it is open (a resume and a late result may both offer it). Its item's row is
kept with the count of the item's open images, so that an image costs no ledger read of its own, and so that
the last of them is known: only that one's commit settles the item (the others spare the ledger the look at
the item's images).
"""

from __future__ import annotations

from wanbatch.ledger.records import ImageRow, ItemRow

__all__ = ["OpenImages"]


class OpenImages:
    """The images the downloader has queued and not yet done with, and their items' rows."""

    def __init__(self) -> None:
        self._queued: set[tuple[str, int]] = set()
        self._items: dict[str, tuple[ItemRow, int]] = {}  # item_id -> (row, open images)

    def get(self, item_id: str) -> ItemRow | None:
        """The row kept for ``item_id``, or None when none of its images is open."""
        held = self._items.get(item_id)
        return None if held is None else held[0]

    def held(self, item_id: str) -> ItemRow:
        """The row of ``item_id``, one of whose images is open."""
        return self._items[item_id][0]

    def add(self, image: ImageRow, item: ItemRow) -> bool:
        """Count ``image`` of ``item`` (its row, kept unless one is already) open; False when it was already."""
        key = (image.item_id, image.image_index)
        if key in self._queued:
            return False
        self._queued.add(key)
        row, open_images = self._items.get(image.item_id) or (item, 0)
        self._items[image.item_id] = (row, open_images + 1)
        return True

    def last(self, item_id: str) -> bool:
        """Whether one image of ``item_id`` is open, no more."""
        return self._items[item_id][1] == 1

    def close(self, item_id: str, index: int) -> None:
        """Image ``index`` of ``item_id`` is saved, final or left for a later run: forget it and, with its item's
        last, the item. An image not open (closed already) is let be, so closing twice counts once."""
        if (item_id, index) not in self._queued:
            return
        self._queued.discard((item_id, index))
        row, open_images = self._items[item_id]
        if open_images > 1:
            self._items[item_id] = (row, open_images - 1)
        else:
            del self._items[item_id]
