"""Following submitted tasks to their end, within the account's query budget.

A task is not polled on a fixed timer: each open task carries the time at
which it is next worth asking about, estimated from when it started running
and from how long this model's tasks have recently taken. Polling starts
shortly before the expected end and backs off once a task runs late. All
queries of a region share one even limiter below the account's 20 QPS.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .aio import wait_event
from .budget import Budget
from .errors import ApiError, TransportError
from .states import ImageState, ItemState
from .wire import MalformedAnswer, image_results, parse_service_time_s, url_expires_s

__all__ = ["OpenTask", "Tracker", "TrackerConfig"]

log = logging.getLogger("wanbatch")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackerConfig:
    first_poll_fraction: float = 0.9  #: first poll at this fraction of the expected running time
    min_poll_interval_s: float = 1.0
    max_poll_interval_s: float = 30.0
    idle_tick_s: float = 0.25  #: how often to look for due tasks when none is due sooner
    url_lifetime_s: float = 24 * 3600.0  #: when a result URL carries no Expires
    deadline_margin_s: float = 60.0  #: counted off every deadline, for the lag in seeing a result


@dataclass(order=True, slots=True)
class OpenTask:
    due_s: float
    task_id: str = field(compare=False)
    item_id: str = field(compare=False)
    lane: Any = field(compare=False)
    submitted_s: float = field(compare=False)
    polls: int = field(default=0, compare=False)
    running_since_s: float | None = field(default=None, compare=False)


class Tracker:
    """Holds the open tasks and turns their ends into ledger rows and downloads."""

    def __init__(
        self,
        *,
        ledger,
        clock,
        limiters: dict[str, Any],
        on_images: Callable[[str], None],
        config: TrackerConfig = TrackerConfig(),
        budget: Budget | None = None,
    ) -> None:
        self._ledger, self._clock, self._limiters, self._on_images = ledger, clock, limiters, on_images
        self.config = config
        self.budget = budget or Budget()
        self._heap: list[OpenTask] = []
        self._wake = asyncio.Event()
        self._expected_s: dict[str, float] = {}  #: recent running time per model, smoothed
        self._cancel_requested = self._canceling = False
        self.queries = 0
        self.canceled = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def running(self) -> int:
        """Open tasks last seen RUNNING on the service."""
        return sum(task.running_since_s is not None for task in self._heap)

    def expected_duration_s(self, lane) -> float:
        return self._expected_s.get(lane.offer.model.name, lane.offer.model.typical_duration_s)

    def add(self, *, task_id: str, item_id: str, lane, submitted_s: float) -> None:
        """Start following a task; its first poll waits for the expected time to pass."""
        first = submitted_s + self.expected_duration_s(lane) * self.config.first_poll_fraction
        heapq.heappush(self._heap, OpenTask(first, task_id, item_id, lane, submitted_s))
        self._cancel_requested = self._cancel_requested or self._canceling
        self._wake.set()

    def cancel_pending(self) -> None:
        """Ask the service to cancel every open task still PENDING there, and every task added from now on
        (a create in flight at the interrupt answers after the first sweep)."""
        self._canceling = self._cancel_requested = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll due tasks until ``stop`` is set and no task is open."""
        while not (stop.is_set() and not self._heap):
            if self._cancel_requested:
                self._cancel_requested = False
                await self._cancel_sweep()
                continue
            now = self._clock.now()
            if self._heap and self._heap[0].due_s <= now:
                task = heapq.heappop(self._heap)
                await self._poll(task)
                continue
            wait_s = self.config.idle_tick_s if not self._heap else min(self._heap[0].due_s - now, 5.0)
            await wait_event(self._wake, wait_s / self._clock.speed)

    def record_sync(self, item_id: str, lane, data: dict) -> None:
        """A sync call's answer holds the finished task: record it as if a poll had found it."""
        common = {"task_status": "SUCCEEDED", "ended_ms": self._clock.now_ms()}
        output = data.get("output") if isinstance(data.get("output"), dict) else {}
        try:
            record_results(
                self._ledger,
                item_id,
                output,
                lane=lane,
                now_s=self._clock.now(),
                config=self.config,
                common=common,
                budget=self.budget,
            )
        except MalformedAnswer as exc:
            # A sync answer cannot be asked for again (it has no task id): paid, as far as anyone can tell, and lost.
            paid = lane.offer.price * self._ledger.get(item_id).n_images
            self._ledger.transition(
                item_id, ItemState.expired, error_code="MalformedAnswer", error_message=str(exc), cost=paid, **common
            )
            self.budget.settle(item_id, lane.offer.price * self._ledger.get(item_id).n_images)
            log.warning("✗ %s: the sync answer could not be read: %s", item_id, exc)
            return
        self._on_images(item_id)

    async def _cancel_sweep(self) -> None:
        """Cancel what has not started; a task already running answers UnsupportedOperation and is kept."""
        for task in list(self._heap):
            if task.running_since_s is not None:
                continue
            await self._limiters[task.lane.region].acquire()
            try:
                await task.lane.client.cancel_task(task.task_id)
            except (TransportError, ApiError) as exc:
                log.info("cancel %s: %s; still followed", task.task_id, exc)
                continue
            # By identity: OpenTask compares by due time only, and resumed tasks share one.
            self._heap = [other for other in self._heap if other is not task]
            heapq.heapify(self._heap)
            self._ledger.transition(
                task.item_id,
                ItemState.canceled,
                task_status="CANCELED",
                note="canceled on the service at the user's request",
            )
            task.lane.slots.release()
            self.budget.settle(task.item_id, 0.0)
            self.canceled += 1
            log.info("⊘ %s task %s canceled", task.item_id, task.task_id)

    async def _poll(self, task: OpenTask) -> None:
        lane = task.lane
        await self._limiters[lane.region].acquire()
        self.queries += 1
        task.polls += 1
        try:
            data = await lane.client.get_task(task.task_id)
        except (TransportError, ApiError) as exc:
            log.info("↻ query %s: %s", task.task_id, exc)
            task.due_s = self._clock.now() + self._backoff_s(task)
            heapq.heappush(self._heap, task)
            return
        output = data.get("output")
        if not isinstance(output, dict):
            output = {}  # unreadable: asked again below, like a task still running
        status = output.get("task_status", "")
        if status in TERMINAL:
            try:
                self._finish(task, output, data)
            except MalformedAnswer as exc:
                log.info("↻ query %s: %s", task.task_id, exc)
                task.due_s = self._clock.now() + self._backoff_s(task)
                heapq.heappush(self._heap, task)
                return
            lane.slots.release()
            return
        self._reschedule(task, output)

    def _reschedule(self, task: OpenTask, output: dict) -> None:
        now = self._clock.now()
        if output.get("task_status") == "RUNNING" and task.running_since_s is None:
            # Place the service's scheduled time on our clock through the submit time both sides know.
            submitted = parse_service_time_s(output.get("submit_time"))
            scheduled = parse_service_time_s(output.get("scheduled_time"))
            offset = (scheduled - submitted) if submitted and scheduled else 0.0
            task.running_since_s = task.submitted_s + max(offset, 0.0)
        expected_s = self.expected_duration_s(task.lane)
        if task.running_since_s is not None:
            expected_end = task.running_since_s + expected_s
            due = expected_end if expected_end > now + self.config.min_poll_interval_s else now + self._backoff_s(task)
        else:
            # Still waiting for a slot on the service: look again after roughly one task's time.
            due = now + max(self.config.min_poll_interval_s, expected_s / 2)
        task.due_s = min(due, now + self.config.max_poll_interval_s)
        heapq.heappush(self._heap, task)

    def _backoff_s(self, task: OpenTask) -> float:
        return min(self.config.max_poll_interval_s, self.config.min_poll_interval_s * 2 ** min(task.polls, 6) / 4)

    def _learn(self, model: str, output: dict) -> None:
        start = parse_service_time_s(output.get("scheduled_time"))
        end = parse_service_time_s(output.get("end_time"))
        if start is None or end is None or end < start:
            return
        previous = self._expected_s.get(model)
        self._expected_s[model] = (end - start) if previous is None else 0.8 * previous + 0.2 * (end - start)

    def _finish(self, task: OpenTask, output: dict, data: dict) -> None:
        status = output["task_status"]
        lane, now = task.lane, self._clock.now()
        ledger, item_id = self._ledger, task.item_id
        request_id = str(data.get("request_id") or "")
        common = {"task_status": status, "ended_ms": int(now * 1000), "request_id": request_id}
        if status == "SUCCEEDED":
            self._learn(lane.offer.model.name, output)
            record_results(
                ledger, item_id, output, lane=lane, now_s=now, config=self.config, common=common, budget=self.budget
            )
            if ledger.state_of(item_id) is ItemState.generated:
                self._on_images(item_id)
        elif status == "FAILED":
            code, message = str(output.get("code") or "TaskFailed"), str(output.get("message") or "")
            ledger.transition(item_id, ItemState.failed, error_code=code, error_message=message, **common)
            self.budget.settle(item_id, 0.0)
            log.info("✗ %s task %s FAILED %s: %s", item_id, task.task_id, code, message)
        elif status == "CANCELED":
            ledger.transition(item_id, ItemState.canceled, **common)
            self.budget.settle(item_id, 0.0)
        else:  # UNKNOWN: the task id is gone, more than a day after the task ended.
            ledger.transition(
                item_id,
                ItemState.expired,
                error_code="TaskExpired",
                error_message="the service no longer knows this task (over 24 h old); counted as paid and lost",
                cost=lane.offer.price * ledger.get(item_id).n_images,
                **common,
            )
            # Whether it was billed cannot be known now: count it as paid (and lost).
            self.budget.settle(item_id, lane.offer.price * ledger.get(item_id).n_images)


def _service_to_ours(output: dict, row, now_s: float) -> float:
    """What to add to a time on the service's clock to place it on ours.

    Both sides know when the task was submitted: the service says so in ``submit_time``, and the ledger
    recorded the moment before the POST. Failing that, the task's end is taken as now (a sync answer).
    """
    service_submit = parse_service_time_s(output.get("submit_time"))
    if service_submit is not None and row.submit_started_ms:
        return row.submit_started_ms / 1000 - service_submit
    service_end = parse_service_time_s(output.get("end_time"))
    return now_s - service_end if service_end is not None else 0.0


def record_results(
    ledger,
    item_id: str,
    output: dict,
    *,
    lane,
    now_s: float,
    config: TrackerConfig,
    common: dict,
    budget: Budget | None = None,
) -> None:
    """Record a SUCCEEDED task's images and move the item to generated (or failed if none came out)."""
    from .ledger import ImageRecord  # the ledger owns the record type

    results = image_results(output)  # raises MalformedAnswer before anything is recorded
    row = ledger.get(item_id)
    request = row.request
    to_ours = _service_to_ours(output, row, now_s)
    end_s = parse_service_time_s(output.get("end_time"))
    images, good = [], 0
    for result in results:
        expires = url_expires_s(result.url) if result.url else None
        if expires is None:
            expires = (end_s if end_s is not None else now_s - to_ours) + config.url_lifetime_s
        deadline_s = expires + to_ours
        seed = request.get("seed")
        images.append(
            ImageRecord(
                index=result.index,
                state=ImageState.pending if result.url else ImageState.failed,
                url=result.url,
                deadline_ms=int((deadline_s - config.deadline_margin_s) * 1000),
                seed=None if seed is None else seed + result.index,
                actual_prompt=result.actual_prompt,
                error_code=result.code,
                error_message=result.message,
            )
        )
        good += result.url is not None
    cost = good * lane.offer.price
    if budget is not None:
        budget.settle(item_id, cost)
    # The images are recorded in the item's own move: one commit per task.
    if good:
        ledger.transition(item_id, ItemState.generated, images=images, cost=cost, **common)
        log.info("✓ %s generated %d/%d image(s)", item_id, good, len(images))
    else:
        first = next((r for r in images if r.error_code), None)
        ledger.transition(
            item_id,
            ItemState.failed,
            images=images,
            error_code=first.error_code if first else "NoImages",
            error_message=first.error_message if first else "the task returned no image",
            **common,
        )
