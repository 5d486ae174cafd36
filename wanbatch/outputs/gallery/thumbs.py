"""Thumbnails: made while a run saves its images, and at the end for any still missing.

A thumbnail is a JPEG of at most ``THUMB_SIDE_PX`` a side under ``thumbs/``, mirroring the image's path
under ``images/``. An image of at most ``SMALL_IMAGE_PX`` a side is its own thumbnail. The
:class:`Thumbnailer` takes the downloader's word that an item's images are all saved and makes their
thumbnails in worker threads (Pillow lets go of the GIL while it decodes, resizes and encodes), so the end
of a run has only the page to write.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from wanbatch.atomic import atomic_path
from wanbatch.ledger.records import Recorded
from wanbatch.ledger.states import ImageState

__all__ = [
    "SMALL_IMAGE_PX",
    "THUMBS_DIR",
    "THUMB_SIDE_PX",
    "Thumbnailer",
    "picture",
    "stored_picture",
    "thumb_name",
    "thumbnail_bytes",
]

log = logging.getLogger("wanbatch")

THUMBS_DIR = "thumbs"
#: The long side of a thumbnail: sharp in a 188 px card on a 1.2x screen, ~10 kB as a JPEG.
THUMB_SIDE_PX = 256
#: An image whose long side is at most this is its own thumbnail: shrinking it would save the page little,
#: and decoding, resizing and encoding it would cost more CPU than the image's whole way through the engine.
SMALL_IMAGE_PX = 2 * THUMB_SIDE_PX
THUMB_JPEG_QUALITY = 85
JPEG_OPTIONS = {"quality": THUMB_JPEG_QUALITY, "optimize": True}
#: Worker threads of a run's thumbnailer: a core is left to the engine's event loop.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
#: Thumbnails waiting for a worker at most; past it an item's are left to the end of the run, so that a
#: burst of saves never holds memory or the event loop.
DEFAULT_MAX_QUEUED = 2000


def thumb_name(file_name: str) -> str:
    """Where an image's thumbnail goes: its path under ``images/`` mirrored under ``thumbs/``, as a JPEG."""
    path = PurePosixPath(file_name)
    if path.parts[:1] == ("images",):
        path = path.relative_to("images")
    return str(PurePosixPath(THUMBS_DIR) / path.with_suffix(".jpg"))


def _own_thumbnail(size: str) -> bool:
    """Whether an image of ``size`` ("W*H") is shown as it is: small enough to be its own thumbnail."""
    return max(int(side) for side in size.split("*")) <= SMALL_IMAGE_PX


def picture(run_dir: Path, file_name: str, size: str) -> str:
    """What a card shows: the image itself when small, else its thumbnail (made if missing or older).

    ``size`` is the one asked for ("W*H"): the downloader saved the image only once it had checked it.
    Raises OSError or UnidentifiedImageError when the image is gone or damaged.
    """
    source = run_dir / file_name
    if _own_thumbnail(size):
        if not source.is_file():
            raise FileNotFoundError(f"{source} is gone")
        return file_name
    thumb = thumb_name(file_name)
    _thumbnail(source, run_dir / thumb)
    return thumb


def stored_picture(file_name: str, size: str) -> str:
    """What a card shows of an image in a store: itself when small, else the thumbnail stored beside it."""
    return file_name if _own_thumbnail(size) else thumb_name(file_name)


def _thumbnail(source: Path, target: Path) -> None:
    """Make ``target`` from ``source`` unless it is already newer."""
    try:
        if target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            return
    except FileNotFoundError:
        pass
    rgb = _shrunk(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The end of a run may meet a worker of the run on the same thumbnail: each writes its own temporary file.
    with atomic_path(target) as tmp:
        rgb.save(tmp, "JPEG", **JPEG_OPTIONS)


def thumbnail_bytes(body: bytes, size: str) -> bytes | None:
    """The thumbnail of the image ``body`` of ``size`` ("W*H") as JPEG bytes; None when it is its own thumbnail.
    For a store that is not a folder: the image is in memory, not on this machine's disk."""
    if _own_thumbnail(size):
        return None
    out = io.BytesIO()
    _shrunk(io.BytesIO(body)).save(out, "JPEG", **JPEG_OPTIONS)
    return out.getvalue()


def _shrunk(source: Path | BinaryIO) -> Image.Image:
    with Image.open(source) as img:
        # The service's PNGs may be palette images, which Pillow would shrink by nearest neighbour.
        rgb = img.convert("RGB")
    rgb.thumbnail((THUMB_SIDE_PX, THUMB_SIDE_PX), Image.Resampling.LANCZOS)
    return rgb


class Thumbnailer:
    """Thumbnails of each item's images as soon as the downloader has saved them all, in worker threads.

    :meth:`item_done` is the downloader's ``on_item_done``: it runs on the event loop's thread, takes the
    item's images from what settling it wrote, and queues their thumbnails without waiting.
    """

    def __init__(self, run_dir: Path, *, workers: int = DEFAULT_WORKERS, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self._run_dir, self._max_queued = Path(run_dir), max_queued
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wanbatch-thumbs")
        self._lock = threading.Lock()
        self._queued = 0
        self.made = 0  #: thumbnails made (or found made), for tests and benchmarks
        self.left = 0  #: images left to the end of the run: the queue was full or the image unreadable

    def item_done(self, settled: Recorded) -> None:
        """Queue the thumbnails of the saved images of an item just settled."""
        size = settled.row.request["size"]
        for image in settled.images:
            if image.state is not ImageState.saved:
                continue
            with self._lock:
                if self._queued >= self._max_queued:
                    self.left += 1
                    continue
                self._queued += 1
            self._pool.submit(picture, self._run_dir, image.file_name or "", size).add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._queued -= 1
            if future.cancelled() or future.exception() is not None:
                self.left += 1
            else:
                self.made += 1
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not isinstance(exc, OSError | UnidentifiedImageError):
            log.warning("thumbnail not made: %s", exc)

    def close(self) -> None:
        """Stop: thumbnails being made are finished, those still queued are left to the end of the run."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Thumbnailer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Thumbnailer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # The loop goes on (a live display, signals) while the thumbnails being made are finished.
        await asyncio.to_thread(self.close)
