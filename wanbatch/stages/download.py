"""Saving every generated image before its URL dies, verified.

Images wait in a heap ordered by URL deadline, so after a long stop the ones
closest to being lost go first. Each is read into memory (the size cap bounds
it), then in one trip to a worker thread checked to be a PNG of the size that
was asked for, hashed, written to a partial file, fsynced, renamed into place
atomically and its folder fsynced (:mod:`wanbatch.stages.imagefiles`); only then
does the ledger record it. A crash
between the rename and the commit is healed on resume: the file is already
there with the same hash. Result URLs get no ``Authorization`` header.

Object storage is unkind: a URL that works may first answer 403, 404 or 503,
a body may be cut short. Every failure that may pass (any HTTP error, a
timeout, a reset, a body that is not the image, a disk error) is retried with
a backoff that doubles up to ``retry_max_s``, for as long as the URL lives; the
image is written off as expired only once its deadline has passed. Only a
body over the size cap, a redirect or a URL that is not http(s) ends the
image's tries in this run (it stays pending, with the reason). The stage ends
when nothing it could still save is left, or at once when the user stops the
run: images waiting for a retry then stay pending for the next run.

Here: the queue (which image when), the retries and what the ledger records; fetching an image's bytes and
placing them under its name, in the folder or the store, is :mod:`wanbatch.stages.placing`'s.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from wanbatch.aio import KeyedLock, wait_event
from wanbatch.clock import Clock
from wanbatch.errors import DownloadError, IllegalTransition, StoreConfigError, StoreError, UrlExpired
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ImageRow, ItemRow, Recorded
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.outputs.stores import Store
from wanbatch.stages.imagefiles import reopen_damaged
from wanbatch.stages.openimages import OpenImages
from wanbatch.stages.placing import ImagePlacer
from wanbatch.stages.retries import Job, Waiting

__all__ = ["DownloadConfig", "Downloader"]

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadConfig:
    workers: int = 8
    max_bytes: int = 64 * 1024 * 1024  #: larger bodies are refused: no Wan PNG comes near it
    timeout_s: float = 120.0
    retry_base_s: float = 2.0  #: the first wait after a failed download; it doubles with each failure
    retry_max_s: float = 300.0  #: the longest wait between two tries of one image
    chunk_bytes: int = 256 * 1024
    #: Bytes of images kept in memory while the store refuses them, so a retry does not fetch them again;
    #: past it an image's bytes are let go and fetched again from its URL (which costs nothing) when retried.
    max_held_bytes: int = 512 * 1024 * 1024


class Downloader:
    """Workers that drain the deadline heap into ``run_dir/images``, or into ``store`` when the outputs are in
    object storage (``run_dir`` then holds only the state: the ledger, and partial files of nothing)."""

    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock: Clock,
        session: aiohttp.ClientSession,
        run_dir: Path,
        on_item_done: Callable[[Recorded], None] = lambda settled: None,
        on_refused: Callable[[], None] = lambda: None,
        config: DownloadConfig = DownloadConfig(),
        store: Store | None = None,
        thumbnails: bool = False,
        sharded: bool = False,
    ) -> None:
        self._ledger, self._clock = ledger, clock
        self.run_dir = run_dir
        #: Gets each image's bytes and puts them under its name: in ``run_dir``, or in ``store`` when there is one.
        self._placer = ImagePlacer(
            session=session,
            run_dir=run_dir,
            timeout_s=config.timeout_s,
            max_bytes=config.max_bytes,
            chunk_bytes=config.chunk_bytes,
            store=store,
            thumbnails=thumbnails,
            sharded=sharded,
        )
        self._refused: str | None = None  #: the store refused us (credentials, bucket): nothing more is saved
        self._on_item_done = on_item_done
        self._on_refused = on_refused  #: the store refused us: nothing more should be paid for this run
        self.config = config
        self._heap: list[Job] = []  #: ready to be tried, soonest deadline first
        #: failed jobs waiting for their next try, off the heap so that one image the storage keeps refusing does
        #: not hold back the images behind it (:mod:`wanbatch.stages.retries`)
        self._waiting = Waiting(max_held_bytes=config.max_held_bytes)
        self._interrupted = False
        self._wake = asyncio.Event()
        self._busy = 0
        self._checking = False  #: the saved files are being looked at: the stage does not end before
        self._open = OpenImages()  #: each image queued once while open; its item's row kept meanwhile
        #: Held on an item while one of its images is recorded final: the last to be recorded settles the item.
        self._finals = KeyedLock()
        self.saved = 0
        self.bytes = 0

    def interrupt(self) -> None:
        """The user stopped the run: once the stages before this one end, images waiting for a retry are
        left pending for the next run instead of being waited for."""
        self._interrupted = True
        self._wake.set()

    async def add_recorded(self, recorded: Recorded) -> None:
        """Queue the images of a task just recorded, as the ledger wrote them: no read of its own."""
        pending = recorded.pending
        for image in pending:
            self._push(image, recorded.row)
        if not pending:
            await self._close_item(recorded.row.item_id)
        self._wake.set()

    async def add_item(self, item_id: str) -> None:
        """Queue the pending images of an item the ledger holds (one reopened on resume)."""
        pending = [image for image in await self._ledger.images_of(item_id) if image.state is ImageState.pending]
        if not pending:
            await self._close_item(item_id)  # saved already (queued again after a stop): settle it now
        else:
            item = await self._row(item_id)
            for image in pending:
                self._push(image, item)
        self._wake.set()

    async def _row(self, item_id: str) -> ItemRow:
        """The item's row: the one kept while it has open images, else read."""
        return self._open.get(item_id) or await self._ledger.get(item_id)

    def _push(self, image: ImageRow, item: ItemRow) -> None:
        """Queue ``image`` of ``item`` (its row, read before: from here to the heap nothing awaits, so that two
        images of one item queued at once count each other)."""
        if self._open.add(image, item):
            heapq.heappush(self._heap, Job(image.deadline_ms, image.item_id, image.image_index, image))

    async def _record_final(self, job: Job, write: Callable[..., Awaitable[Recorded | None]]) -> Recorded | None:
        """Make ``write`` (the image's commit, told by ``settle`` whether it is its item's last open image, which
        settles the item too) and close the image, holding the item: a ledger call may suspend, and two images of
        one item ending together must not both ask before either is closed (neither would then settle the item)."""
        async with self._finals.hold(job.item_id):
            settled = await write(settle=self._open.last(job.item_id))
            self._open.close(job.item_id, job.index)
        return settled

    async def load_pending(self) -> int:
        """Queue every image the ledger says is still to be saved (on start and resume). Those it says are saved
        but whose file is gone or damaged are looked for as the stage runs (:meth:`_check_saved`), so that a big
        folder's resume does not wait for a stat of every file before its first request."""
        async for row in self._ledger.iter_items([ItemState.generated]):
            # A stop between an item's last image and its own move leaves it generated with nothing pending.
            await self._ledger.settle(row.item_id)
        count = 0
        async for image in self._ledger.iter_images([ImageState.pending]):
            self._push(image, await self._row(image.item_id))
            count += 1
        self._wake.set()
        return count

    async def _check_saved(self) -> None:
        """Saved images whose file is missing or damaged go back to pending, and are queued again."""
        try:
            for item_id in await reopen_damaged(self._ledger, self.run_dir, now_ms=self._clock.now_ms()):
                await self.add_item(item_id)
        finally:
            self._checking = False
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            if not self._placer.in_store:
                # A store's objects are not looked at again on each start (a HEAD per saved image): the store
                # proved each whole when it took it, and a bucket does not lose objects as a disk loses files.
                self._checking = True
                group.create_task(self._check_saved())
            for _ in range(self.config.workers):
                group.create_task(self._worker(stop))
        self._placer.remove_partial_folder()

    async def _worker(self, stop: asyncio.Event) -> None:
        while True:
            if not (self._interrupted and stop.is_set()):  # stopped: what waits is left for the next run
                self._release_due()
            if not self._heap:
                if stop.is_set() and not self._busy and not self._checking and (self._interrupted or not self._waiting):
                    await self._leave_waiting()
                    self._wake.set()  # let the other workers see the end too
                    return
                await self._idle()
                continue
            job = heapq.heappop(self._heap)
            self._busy += 1
            try:
                again_s = await self._save(job)
                if again_s is None:
                    job.body = None
                    self._open.close(job.item_id, job.index)
                else:
                    self._waiting.put(job, again_s)
            finally:
                self._busy -= 1

    def _release_due(self) -> None:
        """Move the jobs whose wait is over back onto the deadline heap."""
        for job in self._waiting.due(self._clock.now()):
            heapq.heappush(self._heap, job)

    async def _idle(self) -> None:
        """Wait for work: until the next retry is due, and never long (new work wakes us)."""
        next_s = self._waiting.next_s()
        if next_s is None:
            await wait_event(self._wake, 0.2)
            return
        await self._clock.wait_event(self._wake, next_s - self._clock.now(), at_most_wall_s=0.2)

    async def _leave_waiting(self) -> None:
        """The run ends with these still to retry (the user stopped it): pending, with why, for a later run."""
        for job in list(self._waiting.drain()):  # taken out first: the other workers see none left meanwhile
            await self._ledger.update_image(
                job.item_id, job.index, error_code="DownloadFailed", error_message=job.last_error
            )
            log.warning("✗ %s image %d not saved yet: %s", job.item_id, job.index, job.last_error)
            self._open.close(job.item_id, job.index)

    async def _save(self, job: Job) -> float | None:
        """Fetch, check and place one image, then record it (settling its item in the same commit).

        Returns when to try it again (clock seconds), or None when it is done with in this run.
        """
        item_id, index = job.item_id, job.index
        if self._refused is not None:
            return await self._not_saved(job, self._refused, code="StoreRefused")
        try:
            try:
                name, digest, size_bytes = await self._placer.fetch_and_place(self._open.held(item_id), job)
            except StoreConfigError as exc:
                return await self._store_refused(job, exc)
            except DownloadError as exc:
                job.body = None  # the fetch or the body failed: the next try fetches again
                return await self._failed(job, exc)
            except (StoreError, OSError) as exc:  # the body was good; saving it failed: it is kept for the retry
                return await self._failed(job, exc)
        except UrlExpired as exc:
            try:
                healed = await self._stored_already(job)
            except StoreConfigError as unsure:
                return await self._store_refused(job, unsure)
            except StoreError as unsure:  # the store may hold it: written off only once the store says it does not
                return await self._not_saved(job, f"{exc}; the store could not say whether it holds it: {unsure}")
            if healed is not None:
                name, digest, size_bytes = healed
                return await self._saved(job, name, digest, size_bytes)

            expired = functools.partial(
                self._ledger.image_final, item_id, index, ImageState.expired, code="UrlExpired", message=str(exc)
            )
            settled = await self._record_final(job, expired)
            log.warning(
                "✗ %s image %d expired: %s",
                item_id,
                index,
                exc,
                extra={"event": "expired", "item": item_id, "image": index, "state": "expired", "code": "UrlExpired"},
            )
        else:
            return await self._saved(job, name, digest, size_bytes)
        if settled is not None:
            self._on_item_done(settled)
        return None

    async def _saved(self, job: Job, name: str, digest: str, size_bytes: int) -> None:
        """Record ``job``'s image saved as ``name`` (settling its item with its last image)."""
        saved = functools.partial(
            self._ledger.image_saved, job.item_id, job.index, file_name=name, sha256=digest, size_bytes=size_bytes
        )
        try:
            settled = await self._record_final(job, saved)
        except IllegalTransition:
            return None  # no longer pending: recorded already, nothing more to do
        self.saved += 1
        self.bytes += size_bytes
        if settled is not None:
            self._on_item_done(settled)
        return None

    async def _store_refused(self, job: Job, exc: StoreConfigError) -> None:
        """The store refuses us (credentials withdrawn, bucket gone): waiting will not mend it, and every image
        would meet the same. Saving stops, and so does submitting (``on_refused``): an image paid for now could only
        wait. The images stay pending, for a run after the user has acted."""
        if self._refused is None:
            self._refused = str(exc)
            log.error(
                "✗ saving stopped: %s; nothing more is submitted; the images stay pending while their URLs live", exc
            )
            self._on_refused()
        return await self._not_saved(job, str(exc), code="StoreRefused")

    async def _not_saved(self, job: Job, reason: str, *, code: str = "DownloadFailed") -> None:
        """Leave ``job``'s image pending with ``reason``: a later run tries again while its URL lives."""
        await self._ledger.update_image(job.item_id, job.index, error_code=code, error_message=reason)
        log.warning(
            "✗ %s image %d not saved: %s",
            job.item_id,
            job.index,
            reason,
            extra={"event": "not_saved", "item": job.item_id, "image": job.index, "code": code},
        )
        return None

    async def _failed(self, job: Job, exc: DownloadError | StoreError | OSError) -> float | None:
        """When to try ``job`` again after ``exc``: before its deadline, after a backoff (None when ``exc`` is
        final for this run). Raises UrlExpired once the deadline has passed."""
        if isinstance(exc, OSError):
            self._placer.forget_folders()  # a folder may have gone since it was made: make them again
        if not getattr(exc, "retryable", True):
            # Left pending: a later run tries again while the URL lives; the report shows it.
            return await self._not_saved(job, str(exc), code="DownloadFailed")
        now, deadline_s = self._clock.now(), (job.deadline_ms or 0) / 1000
        if now >= deadline_s:
            raise UrlExpired(f"{exc}; the URL's deadline has passed") from None
        job.failures += 1
        job.last_error = str(exc)
        log.info("↻ %s image %d: %s", job.item_id, job.index, exc)
        wait_s = min(self.config.retry_base_s * 2 ** min(job.failures - 1, 30), self.config.retry_max_s)
        return min(now + wait_s, deadline_s)  # one last try as the deadline comes

    async def _close_item(self, item_id: str) -> None:
        settled = await self._ledger.settle(item_id)
        if settled is not None:
            self._on_item_done(settled)

    async def _stored_already(self, job: Job) -> tuple[str, str, int] | None:
        """With a store, when ``job``'s URL has died: the image, if a run before stored it; else None."""
        if not self._placer.in_store:
            return None
        return await self._placer.stored_already(self._open.held(job.item_id), job.index)
