"""The downloader's images between two tries: each waits for its next try, soonest first, its bytes held.

An image whose save failed in a way that may pass (the storage answered 503,
the store is down, the disk is full) waits for a backoff before its next try,
off the deadline heap, so that one image the storage keeps refusing does not
hold back the images behind it. A good image whose saving failed keeps its
bytes while it waits (a store that is down must not make us fetch every image
again), up to a cap on the bytes held: past it, an image's bytes are let go
and fetched again from its URL, which costs nothing, when its turn comes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from wanbatch.ledger.records import ImageRow

__all__ = ["Job", "Waiting"]


@dataclass(order=True, slots=True)
class Job:
    """One image to save, ordered by its URL's deadline."""

    deadline_ms: int
    item_id: str
    index: int
    image: ImageRow = field(compare=False)  #: as the ledger had it when queued: pending, with its URL
    failures: int = field(default=0, compare=False)
    last_error: str = field(default="", compare=False)
    body: bytes | None = field(default=None, compare=False)  #: fetched, kept while a store refuses it


class Waiting:
    """Jobs set aside until their next try (clock seconds), with the bytes they hold kept under ``max_held_bytes``."""

    def __init__(self, *, max_held_bytes: int) -> None:
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0
        self._heap: list[tuple[float, int, Job]] = []  # (when, tie-break, job)
        self._count = 0

    def __bool__(self) -> bool:
        return bool(self._heap)

    def put(self, job: Job, again_s: float) -> None:
        """Set ``job`` aside until ``again_s``, its image's bytes with it while the cap allows."""
        if job.body is not None:
            if self.held_bytes + len(job.body) > self.max_held_bytes:
                job.body = None  # fetched again when its turn comes: the URL costs nothing, memory does
            else:
                self.held_bytes += len(job.body)
        self._count += 1
        heapq.heappush(self._heap, (again_s, self._count, job))

    def next_s(self) -> float | None:
        """When the soonest waiting job is due; None when none waits."""
        return self._heap[0][0] if self._heap else None

    def due(self, now_s: float) -> Iterator[Job]:
        """The jobs whose wait is over by ``now_s``, taken out, soonest first, their bytes still with them."""
        while self._heap and self._heap[0][0] <= now_s:
            job = heapq.heappop(self._heap)[2]
            self.held_bytes -= len(job.body or b"")
            yield job

    def drain(self) -> Iterator[Job]:
        """Every waiting job, taken out and its bytes let go: the run ends with them still to try."""
        while self._heap:
            job = heapq.heappop(self._heap)[2]
            self.held_bytes -= len(job.body or b"")
            job.body = None
            yield job
