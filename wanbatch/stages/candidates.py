"""Whether a task of the list may be the one an ``unknown`` create made: the reconciler's evidence.

A candidate **fits** when its results fit the request: the prompt it echoes
(when it echoes one) is ours, allowing for the service's truncation and
whitespace normalisation; it has no more images than we asked for; and every
image has the requested size (read from the PNG header at its URL, without
the key). Only what was read and found different rules a candidate out: what
cannot be read now leaves it a maybe.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from collections.abc import Mapping

import aiohttp
from aiolimiter import AsyncLimiter

from wanbatch.catalog import Protocol
from wanbatch.clock import Clock
from wanbatch.errors import ApiError, TransportError
from wanbatch.ledger.records import ItemRow
from wanbatch.service.wire import ListRow, MalformedAnswer, TaskStatus, TaskView, task_view
from wanbatch.stages.lane import Lane

__all__ = ["SHORTEST_ECHO", "Judge", "Verdict", "echoes_prompt"]

log = logging.getLogger("wanbatch")

#: The shortest prompt limit the service documents for any model (spec §2.1: 500 or 800 for wan2.2 and below):
#: an echo at least this long that begins our prompt is ours truncated, not a shorter prompt of someone else's.
SHORTEST_ECHO = 400
_PNG_HEAD = struct.Struct(">8sI4sII")  # signature, IHDR length, "IHDR", width, height


class Verdict(enum.Enum):
    FITS = "fits"  #: finished, and its results fit the request
    FITS_BY_PROMPT = "fits by prompt"  #: fits, and echoes our prompt
    MAYBE = "maybe"  #: could be ours: still running, or not readable or checkable yet
    NOT_OURS = "not ours"


def echoes_prompt(echo: str, prompt: str) -> bool:
    """Whether ``echo`` (a result's ``orig_prompt``) is ``prompt`` as the service keeps it: with runs of white
    space made one, and cut at one of its documented limits."""
    echo, prompt = " ".join(echo.split()), " ".join(prompt.split())
    return bool(echo) and prompt.startswith(echo) and (len(echo) == len(prompt) or len(echo) >= SHORTEST_ECHO)


class Judge:
    """Tells whether listed tasks fit an attempt, asking the service as little as it can: a finished task's
    answer and an image's size are asked for once."""

    def __init__(self, *, clock: Clock, limiters: Mapping[str, AsyncLimiter], probe_timeout_s: float) -> None:
        self._clock, self._limiters, self._probe_timeout_s = clock, limiters, probe_timeout_s
        self._finished: dict[str, TaskView] = {}  #: task_id -> what a finished task's query said: asked once
        self._sizes: dict[str, tuple[int, int] | None] = {}  #: image URL -> its (width, height); None: no PNG

    def forget(self) -> None:
        """Drop what finished tasks said: the next unknown outcome looks at the list as it is then."""
        self._finished.clear()

    async def verdict(self, lane: Lane, row: ItemRow, entry: ListRow) -> Verdict:
        """Whether the listed task is this attempt's. Only what was read and found different rules it out."""
        if entry.status is not None and entry.status.unbilled:
            return Verdict.NOT_OURS  # failed or canceled tasks are not billed: nothing of ours to lose
        if entry.status is not TaskStatus.SUCCEEDED:
            return Verdict.MAYBE  # running, or a status that may pass (UNKNOWN for a young task, SUSPENDED)
        view = await self._answer(lane, entry.task_id, row)
        if view is not None and view.status.unbilled:
            return Verdict.NOT_OURS
        if view is None or view.status is not TaskStatus.SUCCEEDED:
            return Verdict.MAYBE  # unreadable, or an answer that lags the list: ask again next sweep
        request = row.request
        if view.prompts and not any(echoes_prompt(text, request["prompt"]) for text in view.prompts):
            return Verdict.NOT_OURS
        if not view.prompts and lane.offer.model.protocol is Protocol.LEGACY and not lane.prompts_hidden:
            # This service's answers do not show the prompt: from now on the lane's creates are told apart by
            # time alone, so only one may be in doubt at a time.
            lane.prompts_hidden = True
            log.warning("? %s results show no prompt: its creates go one at a time while one is in doubt", lane.model)
        if len(view.results) > row.n_images or view.images_asked not in (None, row.n_images):
            return Verdict.NOT_OURS
        if view.size is not None and view.size != request["size"]:
            return Verdict.NOT_OURS
        wanted = tuple(int(side) for side in request["size"].split("*"))
        for result in view.results:
            if result.url is None:
                continue
            size = await self._image_size(lane, result.url)
            if size is None:
                return Verdict.MAYBE  # not read now (an error, or not a PNG): no proof either way
            if size != wanted:
                return Verdict.NOT_OURS
        return Verdict.FITS_BY_PROMPT if view.prompts else Verdict.FITS

    async def _answer(self, lane: Lane, task_id: str, row: ItemRow) -> TaskView | None:
        """What the task's query says (None when it could not be had or read); a finished task is asked once."""
        found = self._finished.get(task_id)
        if found is not None:
            return found
        await self._limiters[lane.scope].acquire()
        try:
            data = await lane.client.get_task(task_id)
            view = task_view(data, sent_s=(row.submit_started_ms or 0) / 1000, now_s=self._clock.now())
        except (ApiError, TransportError, MalformedAnswer) as exc:
            log.info("↻ reconcile: query %s: %s", task_id, exc)
            return None
        if view.status is TaskStatus.SUCCEEDED or view.status.unbilled:
            self._finished[task_id] = view
        return view

    async def _image_size(self, lane: Lane, url: str) -> tuple[int, int] | None:
        """The width and height in the PNG header at ``url`` (no key is sent); None if it cannot be read now."""
        if url in self._sizes:
            return self._sizes[url]
        if not url.startswith(("http://", "https://")):
            return None
        timeout = aiohttp.ClientTimeout(total=self._probe_timeout_s)
        try:
            async with lane.client.session.get(url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                head = await resp.content.readexactly(_PNG_HEAD.size)
        except (aiohttp.ClientError, TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return None
        signature, _, chunk, width, height = _PNG_HEAD.unpack(head)
        if signature != b"\x89PNG\r\n\x1a\n" or chunk != b"IHDR":
            return None
        self._sizes[url] = (width, height)
        return width, height
