"""The downloader's work on disk, done in worker threads so that a slow disk never stalls the event loop.

    place(body, size, partial, final, other)  check an image and write it, durably, under its name
    damaged_files(run_dir, images)            the saved images whose file is gone or not of the size saved
    reopen_damaged(ledger, run_dir, now_ms)   on resume: those images back to pending while their URLs live
    verify_png(source, size)                  whether bytes or a file are a whole PNG of the size asked for

An image is checked before it is written: a PNG of exactly the size that was
asked for, whole. It goes through a partial file, fsynced, renamed into place
and its folder fsynced (:mod:`wanbatch.atomic`), so that the ledger says saved
only of a file that survives a power loss. A name that holds another image
already (two items whose patterns meet) leaves that image alone: the new one
takes its other name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from wanbatch.atomic import write_atomic
from wanbatch.errors import DownloadError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ImageRow
from wanbatch.ledger.states import ImageState
from wanbatch.outputs.gallery.thumbs import thumbnail_bytes
from wanbatch.outputs.stores.base import Hashes, digests

__all__ = ["Placed", "checked", "damaged_files", "place", "reopen_damaged", "verify_png"]

CHECK_PAGE = 2000  #: saved images whose files are looked at in one trip to a worker thread

log = logging.getLogger("wanbatch")


def verify_png(source: Path | BinaryIO, size: str) -> None:
    """Raise DownloadError unless ``source`` (a file or its bytes) is a whole PNG of exactly ``size`` ("W*H")."""
    width, _, height = size.partition("*")
    try:
        with Image.open(source) as img:
            if img.format != "PNG":
                raise DownloadError(f"not a PNG but {img.format}")
            if img.size != (int(width), int(height)):  # a whole image, not what was asked for: asking again won't help
                raise DownloadError(f"PNG is {img.size[0]}*{img.size[1]}, asked for {size}", retryable=False)
            img.verify()
    except DownloadError:
        raise
    except Exception as exc:  # Pillow raises many kinds for a broken file
        raise DownloadError(f"not a valid PNG: {exc}") from None


@dataclass(frozen=True, slots=True)
class Placed:
    own_name: bool  #: False: under the other name, its own being another image's
    sha256: str


def place(body: bytes, size: str, partial: Path, final: Path, other: Path) -> Placed:
    """Check ``body`` is a PNG of ``size`` and write it, durably, through ``partial`` to ``final`` (to ``other`` if
    ``final`` holds a different image); runs in a worker thread. Nothing half-written stays behind."""
    verify_png(io.BytesIO(body), size)
    digest = hashlib.sha256(body).hexdigest()
    own = not final.exists() or _sha256_of(final) == digest
    write_atomic(final if own else other, body, durable=True, temporary=partial)
    return Placed(own_name=own, sha256=digest)


def checked(body: bytes, size: str, *, thumbnail: bool = False) -> tuple[Hashes, bytes | None]:
    """Check ``body`` is a PNG of ``size``: its (md5, sha256), and its thumbnail's JPEG bytes when asked for (None
    for an image that is its own); runs in a worker thread, for an image that goes to a store, not a folder."""
    verify_png(io.BytesIO(body), size)
    return digests(body), thumbnail_bytes(body, size) if thumbnail else None


async def reopen_damaged(ledger: RunLedger, run_dir: Path, *, now_ms: int) -> list[str]:
    """Saved images whose file is missing or not of the size saved go back to pending: a paid image the disk lost
    is fetched again while its URL lives. The files are looked at in a worker thread, a page at a time; the items
    reopened are returned, to be queued again."""
    damaged: list[tuple[ImageRow, Path, int | None]] = []
    page: list[ImageRow] = []
    async for image in ledger.iter_images([ImageState.saved], order_by_deadline=False):
        page.append(image)
        if len(page) >= CHECK_PAGE:
            damaged += await asyncio.to_thread(damaged_files, run_dir, page)
            page = []
    damaged += await asyncio.to_thread(damaged_files, run_dir, page)
    reopened = []
    for image, path, size_bytes in damaged:  # after the read: the ledger's pages are not changed under it
        if size_bytes is None:
            reason = f"{image.file_name} was missing on resume"
        else:
            reason = f"{image.file_name} was {size_bytes} bytes on resume, not {image.size_bytes}"
        if (image.deadline_ms or 0) <= now_ms:
            # Its URL is dead: fetching again cannot help, and the folder may only be moved or unmounted.
            log.warning(
                "? %s image %d: %s; its URL has died, so it stays recorded as saved",
                image.item_id,
                image.image_index,
                reason,
            )
            continue
        if size_bytes is not None:
            with contextlib.suppress(OSError):  # kept beside, not deleted: the bytes are the user's
                path.replace(path.with_name(path.name + ".damaged"))
        await ledger.reopen_image(image.item_id, image.image_index, reason=reason)
        log.warning("↻ %s image %d saved before, fetched again: %s", image.item_id, image.image_index, reason)
        reopened.append(image.item_id)
    return reopened


def damaged_files(run_dir: Path, images: list[ImageRow]) -> list[tuple[ImageRow, Path, int | None]]:
    """The saved images whose file is missing (size None) or not of the size saved; runs in a worker thread."""
    damaged = []
    for image in images:
        path = run_dir / (image.file_name or "")
        try:
            size_bytes = path.stat().st_size if image.file_name else None
        except FileNotFoundError:
            size_bytes = None
        except OSError as exc:  # the disk or a mount cannot say now: leave the image as saved, say so
            log.warning("? %s image %d: could not look at %s: %s", image.item_id, image.image_index, path, exc)
            continue
        if size_bytes != image.size_bytes:
            damaged.append((image, path, size_bytes))
    return damaged


def _sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
