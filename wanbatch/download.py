"""Saving every generated image before its URL dies, verified.

Images wait in a heap ordered by URL deadline, so after a long stop the ones
closest to being lost go first. Each is read into memory (the size cap bounds
it), then in one trip to a worker thread checked to be a PNG of the size that
was asked for, hashed, written to a partial file and renamed into place
atomically; only then does the ledger record it. A crash
between the rename and the commit is healed on resume: the file is already
there with the same hash. Result URLs get no ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import io
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import aiofiles.os
import aiohttp
from PIL import Image

from . import naming
from .aio import wait_event
from .errors import DownloadError, IllegalTransition, UrlExpired
from .records import ImageRow, ItemRow
from .states import ImageState, ItemState

__all__ = ["DownloadConfig", "Downloader", "verify_png"]

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadConfig:
    workers: int = 8
    max_bytes: int = 64 * 1024 * 1024  #: larger bodies are refused: no Wan PNG comes near it
    attempts: int = 6
    timeout_s: float = 120.0
    retry_base_s: float = 2.0
    chunk_bytes: int = 256 * 1024


def verify_png(source: Path | BinaryIO, size: str) -> None:
    """Raise DownloadError unless ``source`` (a file or its bytes) is a whole PNG of exactly ``size`` ("W*H")."""
    width, _, height = size.partition("*")
    try:
        with Image.open(source) as img:
            if img.format != "PNG":
                raise DownloadError(f"not a PNG but {img.format}")
            if img.size != (int(width), int(height)):
                raise DownloadError(f"PNG is {img.size[0]}*{img.size[1]}, asked for {size}")
            img.verify()
    except DownloadError:
        raise
    except Exception as exc:  # Pillow raises many kinds for a broken file
        raise DownloadError(f"not a valid PNG: {exc}") from None


@dataclass(order=True, slots=True)
class _Job:
    deadline_ms: int
    item_id: str
    index: int
    image: ImageRow = field(compare=False)  #: as the ledger had it when queued: pending, with its URL
    attempts: int = 0
    not_before_s: float = 0.0


class Downloader:
    """Workers that drain the deadline heap into ``run_dir/images``."""

    def __init__(
        self,
        *,
        ledger,
        clock,
        session: aiohttp.ClientSession,
        run_dir: Path,
        on_item_done: Callable[[str], None] = lambda item_id: None,
        config: DownloadConfig = DownloadConfig(),
    ) -> None:
        self._ledger, self._clock, self._session = ledger, clock, session
        self.run_dir = run_dir
        self._partial = run_dir / "images" / ".partial"
        self._on_item_done = on_item_done
        self.config = config
        self._heap: list[_Job] = []
        self._wake = asyncio.Event()
        self._busy = 0
        # Each image is queued once while it is open (a resume and a late result may both offer it); the item
        # rows of open images are kept, so an image costs no ledger read of its own.
        self._queued: set[tuple[str, int]] = set()
        self._items: dict[str, tuple[ItemRow, int]] = {}  # item_id -> (row, open images)
        self._folders: set[Path] = set()  # made in this run: one mkdir per folder, not per image
        self._sharded = naming.sharded(ledger)
        self.saved = 0
        self.bytes = 0

    @property
    def idle(self) -> bool:
        return not self._heap and not self._busy

    def add_item(self, item_id: str) -> None:
        pending = [image for image in self._ledger.images_of(item_id) if image.state is ImageState.pending]
        for image in pending:
            self._push(image)
        if not pending:
            self._close_item(item_id)  # saved already (queued again after a stop): settle it now
        self._wake.set()

    def _push(self, image: ImageRow) -> None:
        key = (image.item_id, image.image_index)
        if key in self._queued:
            return
        self._queued.add(key)
        row, open_images = self._items.get(image.item_id) or (None, 0)
        self._items[image.item_id] = (row or self._ledger.get(image.item_id), open_images + 1)
        heapq.heappush(self._heap, _Job(image.deadline_ms, image.item_id, image.image_index, image))

    def _last(self, job: _Job) -> bool:
        """Whether ``job`` is its item's last open image: only that one can settle the item, so the others
        spare the ledger the look at the item's images. Asked with no await before the job's commit and
        ``_done``, so two images of one item ending together cannot both think the other is last."""
        return self._items[job.item_id][1] == 1

    def _done(self, job: _Job) -> None:
        """The job's image is saved, final or left for a later run: forget it and, with its last, its item."""
        self._queued.discard((job.item_id, job.index))
        row, open_images = self._items[job.item_id]
        if open_images > 1:
            self._items[job.item_id] = (row, open_images - 1)
        else:
            del self._items[job.item_id]

    def load_pending(self) -> int:
        """Queue every image the ledger says is still to be saved (on start and resume)."""
        for row in self._ledger.iter_items([ItemState.generated]):
            # A stop between an item's last image and its own move leaves it generated with nothing pending.
            self._ledger.settle(row.item_id)
        count = 0
        for image in self._ledger.iter_images([ImageState.pending]):
            self._push(image)
            count += 1
        self._wake.set()
        return count

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(self.config.workers):
                group.create_task(self._worker(stop))
        # Every partial file is renamed or removed by now; an empty folder would only puzzle whoever looks.
        with contextlib.suppress(OSError):
            self._partial.rmdir()

    async def _worker(self, stop: asyncio.Event) -> None:
        while True:
            if not self._heap:
                if stop.is_set() and not self._busy:
                    self._wake.set()  # let the other workers see the end too
                    return
                await wait_event(self._wake, 0.2)
                continue
            job = heapq.heappop(self._heap)
            delay_s = job.not_before_s - self._clock.now()
            if delay_s > 0:
                heapq.heappush(self._heap, job)
                await asyncio.sleep(min(delay_s / self._clock.speed, 0.2))
                continue
            self._busy += 1
            try:
                if await self._save(job):
                    heapq.heappush(self._heap, job)
                else:
                    self._done(job)
            finally:
                self._busy -= 1

    async def _save(self, job: _Job) -> bool:
        """Fetch, check and place one image, then record it (settling its item in the same commit).

        True when it is to be tried again later (``job.not_before_s`` says when).
        """
        item_id, index = job.item_id, job.index
        try:
            name, digest, size_bytes = await self._fetch(self._items[item_id][0], job.image)
        except UrlExpired as exc:
            settled = self._ledger.image_final(
                item_id, index, ImageState.expired, code="UrlExpired", message=str(exc), settle=self._last(job)
            )
            log.warning(
                "✗ %s image %d expired: %s",
                item_id,
                index,
                exc,
                extra={"event": "expired", "item": item_id, "image": index, "state": "expired", "code": "UrlExpired"},
            )
        except (DownloadError, OSError) as exc:
            if isinstance(exc, OSError):
                self._folders.clear()  # a folder may have gone since it was made: make them again
            job.attempts += 1
            if getattr(exc, "retryable", True) and job.attempts < self.config.attempts:
                job.not_before_s = self._clock.now() + self.config.retry_base_s * 2 ** (job.attempts - 1)
                log.info("↻ %s image %d: %s", item_id, index, exc)
                return True
            # Left pending: a later run tries again while the URL lives; the report shows it.
            self._ledger.update_image(item_id, index, error_code="DownloadFailed", error_message=str(exc))
            log.warning(
                "✗ %s image %d not saved: %s",
                item_id,
                index,
                exc,
                extra={"event": "not_saved", "item": item_id, "image": index, "code": "DownloadFailed"},
            )
            return False
        else:
            try:
                settled = self._ledger.image_saved(
                    item_id, index, file_name=name, sha256=digest, size_bytes=size_bytes, settle=self._last(job)
                )
            except IllegalTransition:
                return False  # no longer pending: recorded already, nothing more to do
            self.saved += 1
            self.bytes += size_bytes
        if settled is not None:
            self._on_item_done(item_id)
        return False

    def _close_item(self, item_id: str) -> None:
        if self._ledger.settle(item_id) is not None:
            self._on_item_done(item_id)

    async def _fetch(self, item, image) -> tuple[str, str, int]:
        url = image.url or ""
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"refusing result URL with scheme {urlsplit(url).scheme!r}", retryable=False)
        name = naming.saved_name(item, image.image_index, image.seed, sharded=self._sharded)
        other_name = name[: -len(".png")] + f"-{item.item_id}-{image.image_index}.png"
        partial = self._partial / f"{item.item_id}-{image.image_index}.part"
        body = await self._stream(url)
        # Made here, not at start: a folder that is unwritable now may be fixed while the URL still lives.
        await self._folder(partial.parent)
        await self._folder((self.run_dir / name).parent)
        # One trip to a worker thread does the CPU and disk work of an image: each trip costs the event loop.
        placed = await asyncio.to_thread(
            _place, body, item.request["size"], partial, self.run_dir / name, self.run_dir / other_name
        )
        return (name if placed.own_name else other_name), placed.sha256, len(body)

    async def _folder(self, path: Path) -> None:
        """Make ``path`` once per run, off the event loop (a slow or network disk must not stall tracking)."""
        if path not in self._folders:
            await aiofiles.os.makedirs(path, exist_ok=True)
            self._folders.add(path)

    async def _stream(self, url: str) -> bytes:
        """The body at ``url``, up to the size cap; no Wan PNG comes near it, so it is held in memory."""
        chunks, size_bytes = [], 0
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status in (403, 404, 410):
                    body = (await resp.content.read(2048)).decode("utf-8", "replace")
                    raise UrlExpired(f"HTTP {resp.status} {_oss_message(body)}")
                if resp.status != 200:
                    raise DownloadError(f"HTTP {resp.status}", retryable=resp.status >= 500 or resp.status == 429)
                if (resp.content_length or 0) > self.config.max_bytes:
                    raise DownloadError(f"body of {resp.content_length} bytes is over the cap", retryable=False)
                async for chunk in resp.content.iter_chunked(self.config.chunk_bytes):
                    size_bytes += len(chunk)
                    if size_bytes > self.config.max_bytes:
                        raise DownloadError("body is over the size cap", retryable=False)
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise DownloadError(f"{type(exc).__name__}: {exc}") from None
        return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class _Placed:
    own_name: bool  #: False: under the other name, its own being another image's
    sha256: str


def _place(body: bytes, size: str, partial: Path, final: Path, other: Path) -> _Placed:
    """Check ``body`` is a PNG of ``size``, write it to ``partial`` and rename it to ``final`` (to ``other`` if
    ``final`` holds a different image); runs in a worker thread. Nothing half-written stays behind."""
    verify_png(io.BytesIO(body), size)
    digest = hashlib.sha256(body).hexdigest()
    try:
        with open(partial, "wb") as out:
            out.write(body)
        own = not final.exists() or _sha256_of(final) == digest
        os.replace(partial, final if own else other)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return _Placed(own_name=own, sha256=digest)


def _oss_message(body: str) -> str:
    code = re.search(r"<Code>(.*?)</Code>", body)
    message = re.search(r"<Message>(.*?)</Message>", body)
    return " ".join(m.group(1) for m in (code, message) if m) or body[:120]


def _sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
