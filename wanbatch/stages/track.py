"""Following submitted tasks to their end, within the account's query budget.

A task is not polled on a fixed timer. Each open task is first looked at
when its end becomes likely: when it started running on the service (seen
there, or inferred: the service starts a model's queued tasks in the order
they came as earlier ones end) plus the shortest running time this model's
tasks have recently taken (``policy="prompt"``) or the longest
(``policy="frugal"``). From then on it is looked at every
``poll_interval_s`` until it ends. When several tasks of a region are due
at once, one page of the account's task list shows them all, and only the
tasks it shows ended are queried for their results. All queries and lists
of a region share one even limiter below the account's 20 QPS.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wanbatch.aio import wait_event
from wanbatch.errors import ApiError, TransportError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow, Recorded
from wanbatch.ledger.states import ItemState
from wanbatch.service.wire import MalformedAnswer, parse_service_time_s
from wanbatch.stages.cancel import CancelOutcome, cancel_on_service
from wanbatch.stages.claims import Claim
from wanbatch.stages.lane import Lane
from wanbatch.stages.results import record_results, write_off

__all__ = ["Durations", "OpenTask", "Tracker", "TrackerConfig"]

log = logging.getLogger("wanbatch")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})
OPEN = frozenset({"PENDING", "RUNNING"})
MAX_RUNNING_S = 24 * 3600.0  #: no task runs longer than the service keeps it
UNKNOWNS_TO_BELIEVE = 3  #: UNKNOWN answers in a row, spaced out, before a task past its lifetime is taken as gone
POLICIES = ("prompt", "frugal")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackerConfig:
    #: "prompt": look from the earliest likely end, so an end is seen within poll_interval_s;
    #: "frugal": look first at the latest likely end, about one query per task, ends seen later
    policy: str = "prompt"
    poll_interval_s: float = 1.6  #: between looks at a task that may have ended (the lag is at most this)
    queued_poll_s: float = 60.0  #: a task thought queued on the service is looked at this often anyway
    max_poll_interval_s: float = 30.0  #: the longest wait after a failed look
    batch_window_s: float = 0.5  #: tasks due this soon are looked at with those due now
    max_look_ahead_s: float = 600.0  #: the longest an open task goes without a look, whatever its times say
    list_rest_s: float = 60.0  #: after a list page left out a due task, queries only for this long
    list_page_size: int = 100
    idle_tick_s: float = 0.25  #: how often to look for due tasks when none is due sooner
    url_lifetime_s: float = 24 * 3600.0  #: when a result URL carries no Expires
    #: how long after its end (or, never seen ended, its creation) the service may forget a task: an UNKNOWN
    #: answer before then is a passing fault, and the task is asked about again
    task_lifetime_s: float = 24 * 3600.0
    deadline_margin_s: float = 60.0  #: counted off every deadline, for the lag in seeing a result

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"tracking policy {self.policy!r}: allowed {', '.join(POLICIES)}")


class Durations:
    """Recent running times of one model's tasks, and from them where its tasks' ends fall.

    Until enough tasks have ended, the catalog's typical time with a spread of ``spread`` either side.
    """

    def __init__(self, typical_s: float, *, keep: int = 50, enough: int = 5, spread: float = 0.3) -> None:
        self._typical_s, self._enough, self._spread = typical_s, enough, spread
        self._recent: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        if 0.0 <= seconds <= MAX_RUNNING_S:  # a time from a garbled answer would misplace every look
            self._recent.append(seconds)

    def share_ended(self, elapsed_s: float) -> float:
        """How likely a task running for ``elapsed_s`` has ended, judged by the recent running times."""
        if len(self._recent) < self._enough:
            low, high = self.earliest_s, self.latest_s
            return min(1.0, max(0.0, (elapsed_s - low) / (high - low))) if high > low else float(elapsed_s >= low)
        return sum(seconds <= elapsed_s for seconds in self._recent) / len(self._recent)

    @property
    def earliest_s(self) -> float:
        if len(self._recent) < self._enough:
            return self._typical_s * (1 - self._spread)
        return min(self._recent) * 0.98

    @property
    def latest_s(self) -> float:
        if len(self._recent) < self._enough:
            return self._typical_s * (1 + self._spread)
        return max(self._recent)


@dataclass(order=True, slots=True)
class OpenTask:
    due_s: float
    task_id: str = field(compare=False)
    row: ItemRow = field(compare=False)  #: the item as it was queued: what recording its end needs
    lane: Lane = field(compare=False)
    claim: Claim = field(compare=False)  #: settled when the task ends
    submitted_s: float = field(compare=False)
    polls: int = field(default=0, compare=False)
    running_since_s: float | None = field(default=None, compare=False)  #: None while thought queued
    seen_running: bool = field(default=False, compare=False)  #: running_since_s came from the service
    ended_s: float | None = field(default=None, compare=False)  #: when a list showed it ended (our clock)
    unknowns: int = field(default=0, compare=False)  #: UNKNOWN answers in a row

    @property
    def item_id(self) -> str:
        return self.row.item_id


@dataclass(slots=True)
class _LaneTasks:
    """What the tracker believes of one lane's tasks on the service: how many run, which wait in order."""

    running: int = 0
    queued: deque[OpenTask] = field(default_factory=deque)


class Tracker:
    """Holds the open tasks and turns their ends into ledger rows and downloads."""

    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock,
        limiters: dict[str, Any],
        on_images: Callable[[Recorded], None],
        config: TrackerConfig = TrackerConfig(),
    ) -> None:
        self._ledger, self._clock, self._limiters, self._on_images = ledger, clock, limiters, on_images
        self.config = config
        self._heap: list[OpenTask] = []
        self._wake = asyncio.Event()
        self._durations: dict[str, Durations] = {}
        self._lanes: dict[int, _LaneTasks] = {}
        self._lists_rest_until: dict[str, float] = {}  #: region -> until when it is looked at by queries only
        self._cancel_requested = self._canceling = False
        self.queries = 0
        self.lists = 0
        self.canceled = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def running(self) -> int:
        """Open tasks running on the service, as far as the tracker knows."""
        return sum(lane.running for lane in self._lanes.values())

    def durations(self, lane: Lane) -> Durations:
        model = lane.offer.model
        found = self._durations.get(model.name)
        if found is None:
            found = self._durations[model.name] = Durations(model.typical_duration_s)
        return found

    def add(
        self, *, task_id: str, row: ItemRow, claim: Claim, lane: Lane, submitted_s: float, resumed: bool = False
    ) -> None:
        """Start following the task of the queued item ``row`` (its ``claim`` is settled when it ends): thought
        running if the lane has a free place on the service, else queued.

        A ``resumed`` task (from an earlier run) is looked at at once: how long it has been open is not known.
        """
        task = OpenTask(submitted_s, task_id, row, lane, claim, submitted_s)
        tasks = self._lane_tasks(lane)
        if resumed:
            tasks.queued.append(task)
        elif tasks.running < lane.offer.concurrency:
            self._start(task, submitted_s)
        else:
            tasks.queued.append(task)
            task.due_s = self._capped(submitted_s + self._next_look_s(task), submitted_s)
        heapq.heappush(self._heap, task)
        self._cancel_requested = self._cancel_requested or self._canceling
        self._wake.set()

    def cancel_pending(self) -> None:
        """Ask the service to cancel every open task still PENDING there, and every task added from now on
        (a create in flight at the interrupt answers after the first sweep)."""
        self._canceling = self._cancel_requested = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Look at due tasks until ``stop`` is set and no task is open."""
        while not (stop.is_set() and not self._heap):
            if self._cancel_requested:
                self._cancel_requested = False
                await self._cancel_sweep()
                continue
            now = self._clock.now()
            if self._heap and self._heap[0].due_s <= now:
                await self._look(self._pop_due(now + self.config.batch_window_s))
                continue
            wait_s = self.config.idle_tick_s if not self._heap else min(self._heap[0].due_s - now, 5.0)
            await wait_event(self._wake, wait_s / self._clock.speed)

    def record_sync(self, row: ItemRow, claim: Claim, data: dict) -> None:
        """A sync call's answer holds the finished task of the queued item ``row``: record it as if a poll had
        found it, and settle its ``claim``."""
        item_id = row.item_id
        common = {"task_status": "SUCCEEDED", "ended_ms": self._clock.now_ms()}
        output = data.get("output") if isinstance(data.get("output"), dict) else {}
        try:
            recorded = record_results(
                self._ledger,
                row,
                output,
                now_s=self._clock.now(),
                config=self.config,
                common=common,
                claim=claim,
                durable=True,  # its URLs are nowhere else: a power loss must not take them
            )
        except MalformedAnswer as exc:
            # A sync answer cannot be asked for again (it has no task id): paid, as far as anyone can tell, and lost,
            # at the price stored when it was planned (the catalog may have moved).
            write_off(
                self._ledger, item_id, paid=claim.price, code="MalformedAnswer", message=str(exc), claim=claim, **common
            )
            log.warning("✗ %s: the sync answer could not be read: %s", item_id, exc)
            return
        if recorded.row.state is ItemState.generated:
            self._on_images(recorded)

    # -- what the tracker believes runs where ---------------------------------------------------------------

    def _lane_tasks(self, lane: Lane) -> _LaneTasks:
        return self._lanes.setdefault(id(lane), _LaneTasks())

    def _start(self, task: OpenTask, since_s: float) -> None:
        """``task`` runs on the service since ``since_s`` (our clock): first look when its end becomes likely."""
        durations, now = self.durations(task.lane), self._clock.now()
        # Not before it was sent, not in the future: a garbled time must not put its look out of reach.
        task.running_since_s = min(max(since_s, task.submitted_s), now) if math.isfinite(since_s) else now
        self._lane_tasks(task.lane).running += 1
        first = durations.earliest_s if self.config.policy == "prompt" else durations.latest_s
        task.due_s = self._capped(max(task.running_since_s + first, now), now)

    def _capped(self, due_s: float, now: float) -> float:
        return min(due_s, now + self.config.max_look_ahead_s)

    def _seen(self, task: OpenTask, status: str, started_after_submit_s: float | None) -> None:
        """The service says ``task`` is PENDING or RUNNING (started this long after it was submitted)."""
        tasks = self._lane_tasks(task.lane)
        if status == "RUNNING" and not task.seen_running:
            task.seen_running = True
            since = task.submitted_s + max(started_after_submit_s or 0.0, 0.0)
            if task.running_since_s is None:
                _discard(tasks.queued, task)
            else:
                tasks.running -= 1
            self._start(task, since)
            task.due_s = max(task.due_s, self._clock.now() + self.config.poll_interval_s)  # just seen running
        elif status == "PENDING" and task.running_since_s is not None and not task.seen_running:
            # Thought running, still queued (the account runs other tasks too): wait for the next end. (Once
            # seen running it never is queued again: a page that says so is older than what we saw.)
            task.running_since_s = None
            tasks.running -= 1
            tasks.queued.appendleft(task)

    def _ended(self, task: OpenTask, end_s: float | None) -> None:
        """``task`` left the service (at ``end_s`` on our clock, if known): the next queued task starts then."""
        tasks = self._lane_tasks(task.lane)
        if task.running_since_s is not None:
            tasks.running -= 1
        else:
            _discard(tasks.queued, task)
        since = end_s if end_s is not None else self._clock.now()
        moved = False
        while tasks.queued and tasks.running < task.lane.offer.concurrency:
            self._start(tasks.queued.popleft(), since)
            moved = True
        if moved:
            heapq.heapify(self._heap)

    # -- looking --------------------------------------------------------------------------------------------

    def _pop_due(self, until_s: float) -> list[OpenTask]:
        due = []
        while self._heap and self._heap[0].due_s <= until_s:
            due.append(heapq.heappop(self._heap))
        return due

    async def _look(self, due: list[OpenTask]) -> None:
        """Look at every due task: one list per region where several are due, else a query each."""
        by_region: dict[str, list[OpenTask]] = {}
        for task in due:
            by_region.setdefault(task.lane.region, []).append(task)
        async with asyncio.TaskGroup() as group:  # side by side: a slow answer does not hold up the others
            for region, tasks in by_region.items():
                group.create_task(self._look_in(region, tasks))

    async def _look_in(self, region: str, due: list[OpenTask]) -> None:
        resting = self._clock.now() < self._lists_rest_until.get(region, 0.0)
        if not resting and self._list_saves(due) and await self._list(region, due):
            return
        await _each(self._poll, due)

    def _list_saves(self, due: list[OpenTask]) -> bool:
        """Whether one list plus a query per task it shows ended costs less than a query per task: it does
        when more than one of them is likely still running."""
        now = self._clock.now()
        running = sum(
            0.5  # queued, or resumed from an earlier run: no telling
            if task.running_since_s is None
            else 1.0 - self.durations(task.lane).share_ended(now - task.running_since_s)
            for task in due
        )
        return running > 1.0

    async def _list(self, region: str, due: list[OpenTask]) -> bool:
        """One page of the region's task list for ``due`` and every other open task of the region; the
        tasks it shows ended are queried for their results. False if the list could not be had."""
        open_tasks = due + [task for task in self._heap if task.lane.region == region]
        await self._limiters[region].acquire()
        self.lists += 1
        size = min(self.config.list_page_size, len(open_tasks) + 5)
        try:
            data = await due[0].lane.client.list_tasks(page_no=1, page_size=size)
        except (TransportError, ApiError) as exc:
            log.info("↻ list %s: %s", region, exc)
            return False
        entries = _list_entries(data)
        due_ids, now = {id(task) for task in due}, self._clock.now()
        ended = []
        for task in open_tasks:
            entry = entries.get(task.task_id)
            status = entry["status"] if entry else ""
            if status in TERMINAL or (id(task) in due_ids and status not in OPEN):
                ended.append(task)  # queried for its results, or by itself: not on this page, or unreadable
                ended_after_s = _after_create_s(entry, "end_time") if status in TERMINAL else None
                if ended_after_s is not None:
                    task.ended_s = task.submitted_s + ended_after_s
                continue
            looked_due = task.due_s
            if status in OPEN:
                self._seen(task, status, _after_create_s(entry, "start_time"))
            if id(task) in due_ids:
                task.polls += 1
                task.due_s = self._next_due(task, looked_due, now)
            elif status in OPEN:
                # Seen now though not due: its next look is an interval on at the soonest (which also lines
                # the looks of a region's tasks up, so that one list serves them all next time).
                task.due_s = self._capped(max(task.due_s, now + self._next_look_s(task)), now)
        if any(id(task) in due_ids and task.task_id not in entries for task in open_tasks):
            # The page is the newest tasks of the whole account: others' tasks pushed ours off it.
            self._lists_rest_until[region] = now + self.config.list_rest_s
        ended_ids = {id(task) for task in ended}
        # From the heap as it is now: tasks added while the list was on its way are in it.
        self._heap = [task for task in (*self._heap, *due) if id(task) not in ended_ids]
        heapq.heapify(self._heap)
        await _each(self._poll, ended)
        return True

    async def _cancel_sweep(self) -> None:
        """Cancel what has not started; a task already running answers UnsupportedOperation and is kept."""
        for task in list(self._heap):
            if task.seen_running:
                continue
            await self._limiters[task.lane.region].acquire()
            note = "canceled on the service at the user's request"
            outcome = await cancel_on_service(self._ledger, task.lane.client, task.item_id, task.task_id, note=note)
            if outcome is not CancelOutcome.canceled:
                continue  # still followed
            # By identity: OpenTask compares by due time only, and resumed tasks share one.
            self._heap = [other for other in self._heap if other is not task]
            heapq.heapify(self._heap)
            self._ended(task, None)
            task.claim.settle(0.0)  # canceled before it ran: nothing billed
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
            self._again(task, self._backoff_s(task))
            return
        output = data.get("output")
        if not isinstance(output, dict):
            output = {}  # unreadable: asked again below, like a task still running
        status = output.get("task_status", "")
        if not isinstance(status, str):
            status = ""
        task.unknowns = task.unknowns + 1 if status == "UNKNOWN" else 0
        if status == "UNKNOWN" and not (self._forgettable(task) and task.unknowns >= UNKNOWNS_TO_BELIEVE):
            # Young tasks are known to the service: an UNKNOWN now is a passing fault, not a forgotten task. An
            # old one (whose end we may not have seen) is believed forgotten only when the answer holds.
            log.info("↻ query %s: UNKNOWN, though the service may still know it", task.task_id)
            self._again(task, max(self._backoff_s(task), self.config.max_poll_interval_s))
            return
        if status in TERMINAL:
            try:
                self._finish(task, output, data)
            except MalformedAnswer as exc:
                log.info("↻ query %s: %s", task.task_id, exc)
                self._again(task, self._backoff_s(task))
                return
            self._ended(task, self._on_our_clock(task, output, "end_time"))
            return
        looked_due = task.due_s
        if status in OPEN:
            submitted = parse_service_time_s(output.get("submit_time"))
            scheduled = parse_service_time_s(output.get("scheduled_time"))
            self._seen(task, status, (scheduled - submitted) if submitted and scheduled else None)
        task.due_s = self._next_due(task, looked_due, self._clock.now())
        heapq.heappush(self._heap, task)

    def _next_due(self, task: OpenTask, looked_due: float, now: float) -> float:
        """When to look again at a task that was due at ``looked_due`` and was just seen still open.

        A running task's looks keep their cadence from the times they were due, not from when the answers
        came, so that a late event loop does not stretch the interval (and the lag) a little every time.
        """
        if task.running_since_s is None:
            return self._capped(max(task.due_s, now + self._next_look_s(task)), now)
        if task.due_s > looked_due:
            return task.due_s  # its end was just placed (first seen running): look when that becomes likely
        interval = self.config.poll_interval_s
        return max(looked_due + interval, now + interval / 4)

    def _next_look_s(self, task: OpenTask) -> float:
        """How long after a look that found ``task`` still open to look again."""
        if task.running_since_s is not None:
            return self.config.poll_interval_s
        return max(self.config.queued_poll_s, self.durations(task.lane).latest_s)

    def _again(self, task: OpenTask, after_s: float) -> None:
        task.due_s = self._clock.now() + after_s
        heapq.heappush(self._heap, task)

    def _forgettable(self, task: OpenTask) -> bool:
        """Whether the service may have forgotten ``task``: its lifetime has passed since it ended, or, never
        seen ended, since it was made."""
        since_s = task.ended_s if task.ended_s is not None else task.submitted_s
        return self._clock.now() >= since_s + self.config.task_lifetime_s

    def _backoff_s(self, task: OpenTask) -> float:
        return min(self.config.max_poll_interval_s, self.config.poll_interval_s * 2 ** min(task.polls, 6) / 4)

    @staticmethod
    def _on_our_clock(task: OpenTask, output: dict, key: str) -> float | None:
        """A time of the service's answer placed on our clock through the submit time both sides know."""
        submitted, value = parse_service_time_s(output.get("submit_time")), parse_service_time_s(output.get(key))
        if submitted is None or value is None:
            return None
        return task.submitted_s + (value - submitted)

    def _learn(self, lane: Lane, output: dict) -> None:
        start = parse_service_time_s(output.get("scheduled_time"))
        end = parse_service_time_s(output.get("end_time"))
        if start is not None and end is not None and end >= start:
            self.durations(lane).add(end - start)

    def _finish(self, task: OpenTask, output: dict, data: dict) -> None:
        status = output["task_status"]
        lane, now = task.lane, self._clock.now()
        ledger, item_id = self._ledger, task.item_id
        request_id = str(data.get("request_id") or "")
        common = {"task_status": status, "ended_ms": int(now * 1000), "request_id": request_id}
        if status == "SUCCEEDED":
            self._learn(lane, output)
            recorded = record_results(
                ledger, task.row, output, now_s=now, config=self.config, common=common, claim=task.claim
            )
            if recorded.row.state is ItemState.generated:
                self._on_images(recorded)
        elif status == "FAILED":
            code, message = str(output.get("code") or "TaskFailed"), str(output.get("message") or "")
            ledger.transition(
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
        elif status == "CANCELED":
            ledger.transition(item_id, ItemState.canceled, expect=ItemState.queued, **common)
            task.claim.settle(0.0)
        else:  # UNKNOWN past the task's lifetime: the task id is gone; whether it was billed cannot be known
            # now: count it as paid (and lost), at the price stored when it was planned.
            write_off(
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


def _discard(queue: deque[OpenTask], task: OpenTask) -> None:
    for i, other in enumerate(queue):
        if other is task:
            del queue[i]
            return


def _list_entries(data: dict) -> dict[str, dict]:
    """The readable ``data[]`` entries of a task list answer, by task id; anything else is left out."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return {}
    return {
        entry["task_id"]: entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("task_id"), str) and isinstance(entry.get("status"), str)
    }


def _after_create_s(entry: dict, key: str) -> float | None:
    """How long after its creation a listed task reached its time ``key`` (start_time, end_time; list times are
    epoch milliseconds); None when unreadable or out of a task's life."""
    created, value = entry.get("gmt_create"), entry.get(key)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (created, value)):
        return None
    try:
        seconds = (float(value) - float(created)) / 1000
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and 0.0 <= seconds <= MAX_RUNNING_S else None
