"""A simulated task and the queue it waits in.

A task's whole life is decided when it is submitted: the lane of its account
and model gives it a start time (when a concurrency slot frees) and an end
time (start + drawn duration), and its images' outcomes are drawn. Its status
at any instant is then read off those times (:meth:`Task.status_at`), so the
lifecycle is right under a stepped clock and needs nobody to poll. Only a
cancel changes the plan: the lane re-schedules the tasks queued behind it.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field

from wanbatch import catalog

__all__ = ["Endpoint", "GenerationRequest", "ImageResult", "Lane", "Task", "TaskStatus"]


class TaskStatus(enum.StrEnum):
    """The statuses the service reports (SUSPENDED exists in the SDK but never here)."""

    #: accepted, waiting for one of the account's concurrency slots for this model
    PENDING = "PENDING"
    #: generating
    RUNNING = "RUNNING"
    #: ended with at least one image
    SUCCEEDED = "SUCCEEDED"
    #: ended with no image (parameters, moderation, or every image failed)
    FAILED = "FAILED"
    #: canceled while PENDING
    CANCELED = "CANCELED"
    #: never existed, or ended longer ago than the task lifetime (purged)
    UNKNOWN = "UNKNOWN"


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.UNKNOWN})


class Endpoint(enum.StrEnum):
    """The create endpoints, by path under ``services/aigc/``."""

    #: async create, legacy protocol (all models but wan2.6)
    LEGACY = "text2image/image-synthesis"
    #: async create, new protocol (wan2.6)
    ASYNC = "image-generation/generation"
    #: sync generation, new protocol (wan2.6); answers when the images are done
    SYNC = "multimodal-generation/generation"

    @property
    def kind(self) -> str:
        """``legacy``, ``async`` or ``sync``: the billing log's name for the endpoint."""
        return self.name.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """A create request after validation: what to generate."""

    prompt: str  #: already truncated to the model's limit
    negative_prompt: str
    width: int
    height: int
    n: int
    seed: int  #: image i uses seed + i
    prompt_extend: bool
    watermark: bool

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One image of a task: generated (``ok``) or failed with the service's code and message."""

    index: int
    seed: int
    ok: bool
    code: str = ""
    message: str = ""


@dataclass(slots=True, eq=False)
class Task:
    """One submitted generation, its plan in simulated epoch seconds."""

    task_id: str
    request_id: str
    account: str
    key_id: str
    offer: catalog.Offer
    endpoint: Endpoint
    fingerprint: str
    request: GenerationRequest | None  #: None when the parameters were invalid (``param_errors="task"``)
    submit_s: float
    duration_s: float
    images: tuple[ImageResult, ...]  #: the outcome of each image, drawn at submit
    url_ttl_s: float = 86400.0
    start_s: float = 0.0
    end_s: float = 0.0
    canceled_s: float | None = None
    version: int = 0  #: bumped whenever start/end move, so stale billing events are skipped
    object_keys: tuple[str, ...] = field(default=())
    neighbour: bool = False  #: made by another user of the account, not by the simulator's caller
    sent_s: float = 0.0  #: when its create reached the simulator (before ``submit_s`` for a late create)
    listed_s: float = 0.0  #: from when ``GET /tasks`` shows it (after ``submit_s`` under list lag)
    echo: str | None = None  #: the ``orig_prompt`` results carry, when it is not the prompt (echo variant)
    read_unknown: bool = False  #: a query has already been answered UNKNOWN for it (query_unknown)

    @property
    def sync(self) -> bool:
        """A sync call's task: never listed nor queryable, but it takes a slot and is billed."""
        return self.endpoint is Endpoint.SYNC

    @property
    def orig_prompt(self) -> str:
        """The prompt its results echo: the request's, unless the echo varies (``echo_variant``)."""
        return (self.request.prompt if self.request else "") if self.echo is None else self.echo

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def model(self) -> str:
        return self.offer.api_name

    @property
    def succeeded_images(self) -> list[ImageResult]:
        return [img for img in self.images if img.ok]

    @property
    def failure(self) -> tuple[str, str]:
        """The (code, message) a FAILED task reports: its first failed image's."""
        first = next((img for img in self.images if not img.ok), None)
        return (first.code, first.message) if first else ("", "")

    @property
    def url_expires_s(self) -> float:
        return self.end_s + self.url_ttl_s

    def gone_s(self, task_ttl_s: float) -> float:
        """When the task turns UNKNOWN."""
        return (self.end_s if self.canceled_s is None else self.canceled_s) + task_ttl_s

    def status_at(self, now_s: float, task_ttl_s: float) -> TaskStatus:
        if now_s >= self.gone_s(task_ttl_s):
            return TaskStatus.UNKNOWN
        if self.canceled_s is not None:
            return TaskStatus.CANCELED
        if now_s < self.start_s:
            return TaskStatus.PENDING
        if now_s < self.end_s:
            return TaskStatus.RUNNING
        return TaskStatus.SUCCEEDED if self.succeeded_images else TaskStatus.FAILED


class Lane:
    """The FIFO of one account's concurrency slots for one model.

    ``_free_at`` is a heap of the instants the busy slots free up; a new task
    takes the earliest one (or starts at once while a slot was never used), as
    in a first-come first-served queue with ``concurrency`` servers.
    """

    def __init__(self, concurrency: int | None) -> None:
        self.concurrency = concurrency
        self._free_at: list[float] = []
        self._active: list[Task] = []  #: in submit order; may still hold ended tasks (pruned lazily)
        self._prune_at = 64

    def schedule(self, task: Task, now_s: float) -> None:
        """Give ``task`` (submitted at ``now_s``) its start and end times."""
        if self.concurrency is None or len(self._free_at) < self.concurrency:
            start = now_s
        else:
            start = max(now_s, heapq.heappop(self._free_at))
        task.start_s, task.end_s = start, start + task.duration_s
        if self.concurrency is not None:
            heapq.heappush(self._free_at, task.end_s)
            self._active.append(task)
            if len(self._active) >= self._prune_at:
                self._active = [t for t in self._active if t.end_s > now_s]
                self._prune_at = max(64, 2 * len(self._active))

    def restore(self, task: Task) -> None:
        """Take back a task an earlier process scheduled (times kept); tasks come in the order they were made."""
        if self.concurrency is None:
            return
        # Pushing then popping the earliest is what schedule() did, popping first: the end is never earlier.
        heapq.heappush(self._free_at, task.end_s)
        if len(self._free_at) > self.concurrency:
            heapq.heappop(self._free_at)
        self._active.append(task)

    def cancel(self, task: Task, now_s: float) -> list[Task]:
        """Cancel the PENDING ``task``; the tasks queued behind it move up. Returns the moved tasks."""
        task.canceled_s = task.end_s = now_s
        task.version += 1
        if self.concurrency is None:
            return []
        self._active = [t for t in self._active if t.end_s > now_s and t.canceled_s is None]
        running = [t for t in self._active if t.start_s <= now_s]
        queued = [t for t in self._active if t.start_s > now_s]
        free_at = [t.end_s for t in running] + [now_s] * max(0, self.concurrency - len(running))
        heapq.heapify(free_at)
        for t in queued:
            t.start_s = max(now_s, heapq.heappop(free_at))
            t.end_s = t.start_s + t.duration_s
            t.version += 1
            heapq.heappush(free_at, t.end_s)
        self._free_at = free_at
        return queued
