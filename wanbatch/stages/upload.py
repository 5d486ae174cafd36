"""Saving images into object storage: the downloader's path when ``--out`` is a bucket.

An image counts as saved only once the store has proved it holds the whole
object (:mod:`wanbatch.outputs.stores`). Keys are deterministic (the naming
pattern), so before each upload a ``stat`` (a HEAD) asks what the key holds:
the image itself, whole, left by a run that stopped between its upload and the
ledger's commit, is recorded as it is, with no second upload; another image
(two items whose patterns meet) is left alone and the image takes its other
name, as in a folder. Each object carries its owner (the item, image index
and task), so that an image whose URL has died can still be recorded from the
store when a run before this one stored it.
"""

from __future__ import annotations

import asyncio
import logging

from wanbatch.errors import DownloadError, StoreError
from wanbatch.ledger.records import ItemRow
from wanbatch.manifest import naming
from wanbatch.outputs.gallery.thumbs import thumb_name
from wanbatch.outputs.stores import Store
from wanbatch.stages.imagefiles import checked

__all__ = ["Uploader", "owner_of"]

log = logging.getLogger("wanbatch")


def owner_of(item: ItemRow, index: int) -> str:
    """Whose an object is, kept with it in the store: the image's item, index and task. The task tells this image
    from the same item's image of another task (a run of the same manifest with another state folder)."""
    return f"{item.item_id}/{index}" + (f"/{item.task_id}" if item.task_id else "")


class Uploader:
    """Images into ``store``; with ``thumbnails``, each big image's thumbnail stored beside it for the gallery."""

    def __init__(self, store: Store, *, thumbnails: bool) -> None:
        self.store, self.thumbnails = store, thumbnails

    async def save(self, item: ItemRow, index: int, name: str, other_name: str, body: bytes) -> tuple[str, str, int]:
        """Check ``body`` and put it in the store under ``name`` (``other_name`` if ``name`` holds another image);
        returns (key, sha256, size) once the store proves it holds all of it, or already held it whole."""
        hashes, thumb = await asyncio.to_thread(checked, body, item.request["size"], thumbnail=self.thumbnails)
        for key in (name, other_name):
            held = await self.store.stat(key)
            if held is None:
                await self.store.put_verified(key, body, owner=owner_of(item, index), hashes=hashes)
            elif not held.holds(len(body), hashes):
                continue  # another image of this run holds the name: it is left alone
            else:
                log.info("↺ %s is stored already, whole: recorded without a second upload", key)
            if thumb is not None:
                await self._put_thumbnail(key, thumb)
            return key, hashes[1], len(body)
        raise DownloadError(f"{name} and {other_name} both hold other images in {self.store.location}", retryable=False)

    async def stored_already(self, item: ItemRow, index: int, name: str) -> tuple[str, str, int] | None:
        """The image ``index`` of ``item`` (saved as ``name`` or its other name), if a run before this one stored
        it whole and stopped before the ledger's commit: its owner and sha256 on it, the store's MD5 proof. Raises
        StoreError when the store cannot say: the image must not be written off while it may be there."""
        for key in (name, naming.other_name(name, item.item_id, index)):
            held = await self.store.stat(key)
            if held is not None and held.owner == owner_of(item, index) and held.sha256 and held.md5:
                log.info("↺ %s is stored already, whole: recorded, though its URL has died", key)
                return key, held.sha256, held.size_bytes
        return None

    async def _put_thumbnail(self, key: str, thumb: bytes) -> None:
        """The gallery's thumbnail of the image under ``key``: a failure costs a card its picture, not an image."""
        try:
            await self.store.put_verified(thumb_name(key), thumb)
        except StoreError as exc:
            log.info("thumbnail of %s not stored: %s", key, exc)
