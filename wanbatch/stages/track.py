"""Following submitted tasks to their end, within the account's query budget: the network side.

When each open task is due a look is the queue model's business
(:mod:`wanbatch.stages.queue_model`); this module does the looking. When
several tasks of an account are due at once, one page of the account's task
list shows them all, and only the tasks it shows ended are queried for their
results. All queries and lists of an account (without a pool: of a region's
key) share one even limiter below the account's 20 QPS. What a finished task leaves is recorded through
:mod:`wanbatch.stages.results`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from wanbatch.clock import Clock
from wanbatch.errors import ApiError, TransportError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow, Recorded
from wanbatch.ledger.states import ItemState
from wanbatch.service.wire import MalformedAnswer, TaskStatus, TaskView, list_page, task_view
from wanbatch.stages.cancel import CancelOutcome, cancel_on_service
from wanbatch.stages.claims import Claim
from wanbatch.stages.lane import Lane
from wanbatch.stages.queue_model import POLICIES, Durations, OpenTask, QueueModel, TrackerConfig
from wanbatch.stages.results import record_results, write_off

__all__ = ["POLICIES", "Durations", "OpenTask", "Tracker", "TrackerConfig"]

log = logging.getLogger("wanbatch")

UNKNOWNS_TO_BELIEVE = 3  #: UNKNOWN answers in a row, spaced out, before a task past its lifetime is taken as gone


class Tracker:
    """Looks at the open tasks when the queue model says, and turns their ends into ledger rows and downloads."""

    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock: Clock,
        limiters: dict[str, Any],
        on_images: Callable[[Recorded], Awaitable[None]],
        config: TrackerConfig = TrackerConfig(),
    ) -> None:
        self._ledger, self._clock, self._limiters, self._on_images = ledger, clock, limiters, on_images
        self.config = config
        self._model = QueueModel(clock=clock, config=config)
        self._wake = asyncio.Event()
        self._lists_rest_until: dict[str, float] = {}  #: account (scope) -> until when it is looked at by queries only
        self._cancel_requested = self._canceling = False
        self.queries = 0
        self.lists = 0
        self.canceled = 0

    def __len__(self) -> int:
        return len(self._model)

    @property
    def running(self) -> int:
        """Open tasks running on the service, as far as the tracker knows."""
        return self._model.running

    @property
    def queued(self) -> int:
        """Open tasks waiting in the service's queue, as far as the tracker knows."""
        return self._model.queued

    def add(
        self, *, task_id: str, row: ItemRow, claim: Claim, lane: Lane, submitted_s: float, resumed: bool = False
    ) -> None:
        """Start following the task of the queued item ``row`` (its ``claim`` is settled when it ends), known to
        exist since ``submitted_s`` (our clock); see QueueModel.add."""
        self._model.add(task_id=task_id, row=row, claim=claim, lane=lane, submitted_s=submitted_s, resumed=resumed)
        self._cancel_requested = self._cancel_requested or self._canceling
        self._wake.set()

    def cancel_pending(self) -> None:
        """Ask the service to cancel every open task still PENDING there, and every task added from now on
        (a create in flight at the interrupt answers after the first sweep)."""
        self._canceling = self._cancel_requested = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Look at due tasks until ``stop`` is set and no task is open."""
        while not (stop.is_set() and not self._model):
            if self._cancel_requested:
                self._cancel_requested = False
                await self._cancel_sweep()
                continue
            now, next_due_s = self._clock.now(), self._model.next_due_s
            if next_due_s is not None and next_due_s <= now:
                await self._look(self._model.pop_due(now + self.config.batch_window_s))
                continue
            wait_s = self.config.idle_tick_s if next_due_s is None else min(next_due_s - now, 5.0)
            await self._clock.wait_event(self._wake, wait_s)

    async def record_sync(self, row: ItemRow, claim: Claim, data: dict) -> None:
        """A sync call's answer holds the finished task of the queued item ``row``: record it as if a poll had
        found it, and settle its ``claim``."""
        item_id, now = row.item_id, self._clock.now()
        common = {"task_status": TaskStatus.SUCCEEDED.value, "ended_ms": int(now * 1000)}
        sent_s = row.submit_started_ms / 1000 if row.submit_started_ms else None
        try:
            view = task_view(data, sent_s=sent_s, now_s=now, sync=True)
        except MalformedAnswer as exc:
            # A sync answer cannot be asked for again (it has no task id): paid, as far as anyone can tell, and lost,
            # at the price stored when it was planned (the catalog may have moved).
            await write_off(
                self._ledger, item_id, paid=claim.price, code="MalformedAnswer", message=str(exc), claim=claim, **common
            )
            log.warning("✗ %s: the sync answer could not be read: %s", item_id, exc)
            return
        recorded = await record_results(
            self._ledger,
            row,
            view,
            now_s=now,
            config=self.config,
            common=common,
            claim=claim,
            durable=True,  # its URLs are nowhere else: a power loss must not take them
        )
        if recorded.row.state is ItemState.generated:
            await self._on_images(recorded)

    # -- looking --------------------------------------------------------------------------------------------

    async def _look(self, due: list[OpenTask]) -> None:
        """Look at every due task: one list per account (its task list) where several are due, else a query each."""
        by_scope: dict[str, list[OpenTask]] = {}
        for task in due:
            by_scope.setdefault(task.lane.scope, []).append(task)
        async with asyncio.TaskGroup() as group:  # side by side: a slow answer does not hold up the others
            for scope, tasks in by_scope.items():
                group.create_task(self._look_in(scope, tasks))

    async def _look_in(self, scope: str, due: list[OpenTask]) -> None:
        resting = self._clock.now() < self._lists_rest_until.get(scope, 0.0)
        if not resting and self._model.list_saves(due) and await self._list(scope, due):
            return
        await _each(self._poll, due)

    async def _list(self, scope: str, due: list[OpenTask]) -> bool:
        """One page of the account's task list for ``due`` and every other open task of the account; the
        tasks it shows ended are queried for their results. False if the list could not be had."""
        open_tasks = due + [task for task in self._model if task.lane.scope == scope]
        await self._limiters[scope].acquire()
        self.lists += 1
        size = min(self.config.list_page_size, len(open_tasks) + 5)
        try:
            page = list_page(await due[0].lane.client.list_tasks(page_no=1, page_size=size))
        except (TransportError, ApiError) as exc:
            log.info("↻ list %s: %s", scope, exc)
            return False
        due_ids, now = {id(task) for task in due}, self._clock.now()
        ended = []
        for task in open_tasks:
            row = page.by_id.get(task.task_id)
            status = row.status if row else None
            is_open = status is not None and status.is_open
            if not is_open and (status is not None or id(task) in due_ids):
                ended.append(task)  # queried for its results, or by itself: not on this page, or unreadable
                if status is not None:
                    ended_s = task.latest_s(row.on_our_clock(row.ended_s, sent_s=task.sent_s))
                    task.ended_s = task.ended_s if ended_s is None else ended_s
                continue
            looked_due = task.due_s
            if is_open:
                self._model.seen(task, status, row.on_our_clock(row.started_s, sent_s=task.sent_s))
            if id(task) in due_ids:
                task.polls += 1
                task.due_s = self._model.next_due(task, looked_due, now)
            elif is_open:
                self._model.seen_early(task, now)
        if any(id(task) in due_ids and task.task_id not in page.by_id for task in open_tasks):
            # The page is the newest tasks of the whole account: others' tasks pushed ours off it.
            self._lists_rest_until[scope] = now + self.config.list_rest_s
        ended_ids = {id(task) for task in ended}
        self._model.remove(task for task in ended if id(task) not in due_ids)
        self._model.put(task for task in due if id(task) not in ended_ids)
        await _each(self._poll, ended)
        return True

    async def _cancel_sweep(self) -> None:
        """Cancel what has not started; a task already running answers UnsupportedOperation and is kept."""
        for task in list(self._model):
            if task.seen_running:
                continue
            await self._limiters[task.lane.scope].acquire()
            note = "canceled on the service at the user's request"
            outcome = await cancel_on_service(self._ledger, task.lane.client, task.item_id, task.task_id, note=note)
            if outcome is not CancelOutcome.canceled:
                continue  # still followed
            self._model.remove([task])
            self._model.ended(task, None)
            task.claim.settle(0.0)  # canceled before it ran: nothing billed
            self.canceled += 1
            log.info("⊘ %s task %s canceled", task.item_id, task.task_id)

    async def _poll(self, task: OpenTask) -> None:
        lane, model = task.lane, self._model
        await self._limiters[lane.scope].acquire()
        self.queries += 1
        task.polls += 1
        try:
            view = task_view(await lane.client.get_task(task.task_id), sent_s=task.sent_s, now_s=self._clock.now())
        except (TransportError, ApiError, MalformedAnswer) as exc:
            log.info("↻ query %s: %s", task.task_id, exc)
            model.again(task, model.backoff_s(task))
            return
        status = view.status
        task.unknowns = task.unknowns + 1 if status is TaskStatus.UNKNOWN else 0
        if status is TaskStatus.UNKNOWN and not (model.forgettable(task) and task.unknowns >= UNKNOWNS_TO_BELIEVE):
            # Young tasks are known to the service: an UNKNOWN now is a passing fault, not a forgotten task. An
            # old one (whose end we may not have seen) is believed forgotten only when the answer holds.
            log.info("↻ query %s: UNKNOWN, though the service may still know it", task.task_id)
            model.again(task, max(model.backoff_s(task), self.config.max_poll_interval_s))
            return
        if status.is_open:
            looked_due = task.due_s
            model.seen(task, status, view.started_s)
            task.due_s = model.next_due(task, looked_due, self._clock.now())
            model.put([task])
            return
        await self._finish(task, view)
        model.ended(task, view.ended_s)

    async def _finish(self, task: OpenTask, view: TaskView) -> None:
        """Record how ``task`` ended, as ``view`` says."""
        status, now = view.status, self._clock.now()
        ledger, item_id = self._ledger, task.item_id
        common = {"task_status": status.value, "ended_ms": int(now * 1000), "request_id": view.request_id}
        if status is TaskStatus.SUCCEEDED:
            self._model.learn(task.lane, view.running_s)
            recorded = await record_results(
                ledger, task.row, view, now_s=now, config=self.config, common=common, claim=task.claim
            )
            if recorded.row.state is ItemState.generated:
                await self._on_images(recorded)
        elif status is TaskStatus.FAILED:
            code, message = view.code or "TaskFailed", view.message
            await ledger.transition(
                item_id, ItemState.failed, expect=ItemState.queued, error_code=code, error_message=message, **common
            )
            task.claim.settle(0.0)  # a FAILED task is not billed
            log.info(
                "✗ %s task %s FAILED %s: %s",
                item_id,
                task.task_id,
                code,
                message,
                extra={"event": "failed", "item": item_id, "task": task.task_id, "state": "failed", "code": code},
            )
        elif status is TaskStatus.CANCELED:
            await ledger.transition(item_id, ItemState.canceled, expect=ItemState.queued, **common)
            task.claim.settle(0.0)
        else:  # UNKNOWN past the task's lifetime: the task id is gone; whether it was billed cannot be known
            # now: count it as paid (and lost), at the price stored when it was planned.
            await write_off(
                ledger,
                item_id,
                paid=task.claim.price,
                code="TaskExpired",
                message="the service no longer knows this task (past its lifetime); counted as paid and lost",
                claim=task.claim,
                **common,
            )


async def _each(look: Callable[[OpenTask], Awaitable[None]], tasks: list[OpenTask]) -> None:
    """``look`` at every task at once (the region's limiter still spaces the requests)."""
    async with asyncio.TaskGroup() as group:
        for task in tasks:
            group.create_task(look(task))
