"""One image's bytes got from its URL and put in place under its name: the downloader's hands.

:class:`ImagePlacer` fetches a result URL's body (:mod:`wanbatch.stages.fetch`; no ``Authorization`` header)
unless a try before kept it, and places it: into the run folder, checked, written whole and fsynced
(:mod:`wanbatch.stages.imagefiles`), or into the store when the outputs are in object storage
(:mod:`wanbatch.stages.upload`). A name is held while an image is placed under it, so two images whose names
meet never both take it. What happens to the image then (recorded, tried again, written off) is the
downloader's (:mod:`wanbatch.stages.download`).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import aiofiles.os
import aiohttp

from wanbatch.aio import KeyedLock
from wanbatch.errors import DownloadError
from wanbatch.ledger.records import ItemRow
from wanbatch.manifest import naming
from wanbatch.outputs.stores import Store
from wanbatch.stages.fetch import fetch_body
from wanbatch.stages.imagefiles import place
from wanbatch.stages.retries import Job
from wanbatch.stages.upload import Uploader

__all__ = ["ImagePlacer"]


class ImagePlacer:
    """Fetches an image and places it under its name in ``run_dir``, or in ``store`` when there is one."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        run_dir: Path,
        timeout_s: float,
        max_bytes: int,
        chunk_bytes: int,
        store: Store | None = None,
        thumbnails: bool = False,
        sharded: bool = False,
    ) -> None:
        self._session = session
        self.run_dir = run_dir
        self._timeout_s, self._max_bytes, self._chunk_bytes = timeout_s, max_bytes, chunk_bytes
        #: With a store, images go there instead of into ``run_dir``; each big image's thumbnail beside it.
        self._uploader = Uploader(store, thumbnails=thumbnails) if store is not None else None
        self._partial = run_dir / "images" / ".partial"
        self._folders: set[Path] = set()  # made in this run: one mkdir per folder, not per image
        #: Held on a name while an image is placed under it: two items whose patterns meet must not both find
        #: their name free and both write it (the second would replace the first, both recorded saved).
        self._names = KeyedLock()
        self._sharded = sharded  #: the folder's images go to subfolders (:func:`wanbatch.manifest.naming.sharded`)

    @property
    def in_store(self) -> bool:
        """Whether the images go into object storage (else into the run folder)."""
        return self._uploader is not None

    def forget_folders(self) -> None:
        """A folder may have gone since it was made (a disk error): make each again when next needed."""
        self._folders.clear()

    def remove_partial_folder(self) -> None:
        """Every partial file is renamed or removed by now; an empty folder would only puzzle whoever looks."""
        with contextlib.suppress(OSError):
            self._partial.rmdir()

    async def fetch_and_place(self, item: ItemRow, job: Job) -> tuple[str, str, int]:
        """Fetch (unless its bytes are held from a try before), check and store ``job``'s image:
        (its name, sha256, size)."""
        image = job.image
        url = image.url or ""
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"refusing result URL with scheme {urlsplit(url).scheme!r}", retryable=False)
        name = naming.saved_name(item, image.image_index, sharded=self._sharded)
        other_name = naming.other_name(name, item.item_id, image.image_index)
        if job.body is None:
            job.body = await fetch_body(
                self._session,
                url,
                timeout_s=self._timeout_s,
                max_bytes=self._max_bytes,
                chunk_bytes=self._chunk_bytes,
            )
        async with self._names.hold(name):
            return await self._place(item, image.image_index, job.body, name, other_name)

    async def _place(self, item: ItemRow, index: int, body: bytes, name: str, other_name: str) -> tuple[str, str, int]:
        """Check ``body`` and save it under ``name``, or ``other_name`` if ``name`` holds another image."""
        if self._uploader is not None:
            return await self._uploader.save(item, index, name, other_name, body)
        partial = self._partial / f"{item.item_id}-{index}.part"
        # Made here, not at start: a folder that is unwritable now may be fixed while the URL still lives.
        await self._folder(partial.parent)
        await self._folder((self.run_dir / name).parent)
        # One trip to a worker thread does the CPU and disk work of an image: each trip costs the event loop.
        placed = await asyncio.to_thread(
            place, body, item.request["size"], partial, self.run_dir / name, self.run_dir / other_name
        )
        return (name if placed.own_name else other_name), placed.sha256, len(body)

    async def stored_already(self, item: ItemRow, index: int) -> tuple[str, str, int] | None:
        """With a store, when the image's URL has died: the image, if a run before stored it; else None."""
        if self._uploader is None:
            return None
        name = naming.saved_name(item, index, sharded=self._sharded)
        return await self._uploader.stored_already(item, index, name)

    async def _folder(self, path: Path) -> None:
        """Make ``path`` once per run, off the event loop (a slow or network disk must not stall tracking)."""
        if path not in self._folders:
            await aiofiles.os.makedirs(path, exist_ok=True)
            self._folders.add(path)
