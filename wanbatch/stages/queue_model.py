"""What the tracker believes of the service's queue: which open task runs, which waits, and when to look.

A pure model, with no network in it: the tracker tells it what the service
said (a task seen running or queued, a task ended) and asks it which tasks are
due a look. Each open task is first due when its end becomes likely: when it
started running on the service (seen there, or inferred: the service starts a
model's queued tasks in the order they came as earlier ones end) plus the
shortest running time this model's tasks have recently taken
(``policy="prompt"``) or the longest (``policy="frugal"``). From then on it is
due every ``poll_interval_s`` until it ends. Time comes from the injected
clock only, so a test steps a manual clock through a task's life.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from wanbatch.clock import Clock
from wanbatch.ledger.records import ItemRow
from wanbatch.service.wire import MAX_RUNNING_S, TaskStatus
from wanbatch.stages.claims import Claim
from wanbatch.stages.lane import Lane

__all__ = ["POLICIES", "Durations", "OpenTask", "QueueModel", "TrackerConfig"]

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
    submitted_s: float = field(compare=False)  #: when the task was known to exist (our clock): it ran no sooner
    sent_s: float = field(compare=False)  #: when our create was sent (our clock): its times are placed from there
    polls: int = field(default=0, compare=False)
    running_since_s: float | None = field(default=None, compare=False)  #: None while thought queued
    seen_running: bool = field(default=False, compare=False)  #: running_since_s came from the service
    ended_s: float | None = field(default=None, compare=False)  #: when a list showed it ended (our clock)
    unknowns: int = field(default=0, compare=False)  #: UNKNOWN answers in a row

    @property
    def item_id(self) -> str:
        return self.row.item_id

    def latest_s(self, placed_s: float | None) -> float | None:
        """The latest a time of this task placed from its send time can really be: the service stamped the
        task somewhere between our send and its answer, so placed times may be early by that round trip. Looks
        are placed at the latest (never early); deadlines keep the placed, earliest, time (never late)."""
        return None if placed_s is None else placed_s + (self.submitted_s - self.sent_s)


@dataclass(slots=True)
class _LaneTasks:
    """What the model believes of one lane's tasks on the service: how many run, which wait in order."""

    running: int = 0
    queued: deque[OpenTask] = field(default_factory=deque)


class QueueModel:
    """The open tasks, ordered by when each is next due a look, and where each stands on the service's queue."""

    def __init__(self, *, clock: Clock, config: TrackerConfig = TrackerConfig()) -> None:
        self._clock, self.config = clock, config
        self._heap: list[OpenTask] = []
        self._durations: dict[str, Durations] = {}
        self._lanes: dict[int, _LaneTasks] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self):
        """The open tasks not taken out for a look, in no particular order."""
        return iter(list(self._heap))

    @property
    def running(self) -> int:
        """Open tasks running on the service, as far as the model knows."""
        return sum(lane.running for lane in self._lanes.values())

    @property
    def queued(self) -> int:
        """Open tasks thought waiting in the service's queue."""
        return sum(len(lane.queued) for lane in self._lanes.values())

    @property
    def next_due_s(self) -> float | None:
        return self._heap[0].due_s if self._heap else None

    def durations(self, lane: Lane) -> Durations:
        model = lane.offer.model
        found = self._durations.get(model.name)
        if found is None:
            found = self._durations[model.name] = Durations(model.typical_duration_s)
        return found

    def add(
        self, *, task_id: str, row: ItemRow, claim: Claim, lane: Lane, submitted_s: float, resumed: bool = False
    ) -> OpenTask:
        """Start following the task of the queued item ``row`` (its ``claim`` is settled when it ends), known to
        exist since ``submitted_s``: thought running if the lane has a free place on the service, else queued.

        A ``resumed`` task (from an earlier run) is due at once: how long it has been open is not known.
        """
        # The attempt's start, recorded before the POST, is when the create was sent: the task's times' anchor.
        sent_s = min(row.submit_started_ms / 1000, submitted_s) if row.submit_started_ms else submitted_s
        task = OpenTask(submitted_s, task_id, row, lane, claim, submitted_s, sent_s)
        tasks = self._lane_tasks(lane)
        if resumed:
            tasks.queued.append(task)
        elif tasks.running < lane.offer.concurrency:
            self._start(task, submitted_s)
        else:
            tasks.queued.append(task)
            task.due_s = self._capped(submitted_s + self.next_look_s(task), submitted_s)
        heapq.heappush(self._heap, task)
        return task

    def pop_due(self, until_s: float) -> list[OpenTask]:
        """Take out every task due by ``until_s``, soonest first; each goes back by :meth:`put` or :meth:`again`
        or leaves by :meth:`ended`."""
        due = []
        while self._heap and self._heap[0].due_s <= until_s:
            due.append(heapq.heappop(self._heap))
        return due

    def put(self, tasks: Iterable[OpenTask]) -> None:
        """Put tasks taken out for a look back in line (their due times already set). The tasks still in line are
        in heap order: a change to their due times (a list's sweep) is followed by :meth:`remove`, which heapifies."""
        for task in tasks:
            heapq.heappush(self._heap, task)

    def remove(self, tasks: Iterable[OpenTask]) -> None:
        """Take ``tasks`` out of line for good (by identity: tasks compare by due time only)."""
        gone = {id(task) for task in tasks}
        self._heap = [other for other in self._heap if id(other) not in gone]
        heapq.heapify(self._heap)

    # -- what the service said -------------------------------------------------------------------------------

    def seen(self, task: OpenTask, status: TaskStatus, started_s: float | None) -> None:
        """The service says ``task`` is PENDING or RUNNING (running since ``started_s``, placed on our clock from
        its send time, if known)."""
        tasks, started_s = self._lane_tasks(task.lane), task.latest_s(started_s)
        if status is TaskStatus.RUNNING and not task.seen_running:
            task.seen_running = True
            since = task.submitted_s if started_s is None else max(started_s, task.submitted_s)
            if task.running_since_s is None:
                _discard(tasks.queued, task)
            else:
                tasks.running -= 1
            self._start(task, since)
            task.due_s = max(task.due_s, self._clock.now() + self.config.poll_interval_s)  # just seen running
        elif status is TaskStatus.PENDING and task.running_since_s is not None and not task.seen_running:
            # Thought running, still queued (the account runs other tasks too): wait for the next end. (Once
            # seen running it never is queued again: a page that says so is older than what we saw.)
            task.running_since_s = None
            tasks.running -= 1
            tasks.queued.appendleft(task)

    def ended(self, task: OpenTask, end_s: float | None) -> None:
        """``task`` left the service (at ``end_s``, placed on our clock from its send time, if known): the next
        queued task starts then."""
        tasks, end_s = self._lane_tasks(task.lane), task.latest_s(end_s)
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

    def learn(self, lane: Lane, running_s: float | None) -> None:
        """One of ``lane``'s tasks ran this long."""
        if running_s is not None:
            self.durations(lane).add(running_s)

    # -- when to look ----------------------------------------------------------------------------------------

    def next_due(self, task: OpenTask, looked_due: float, now: float) -> float:
        """When to look again at a task that was due at ``looked_due`` and was just seen still open.

        A running task's looks keep their cadence from the times they were due, not from when the answers
        came, so that a late event loop does not stretch the interval (and the lag) a little every time.
        """
        if task.running_since_s is None:
            return self._capped(max(task.due_s, now + self.next_look_s(task)), now)
        if task.due_s > looked_due:
            return task.due_s  # its end was just placed (first seen running): look when that becomes likely
        interval = self.config.poll_interval_s
        return max(looked_due + interval, now + interval / 4)

    def seen_early(self, task: OpenTask, now: float) -> None:
        """``task`` was seen open though not due: its next look is an interval on at the soonest (which also
        lines the looks of a region's tasks up, so that one list serves them all next time)."""
        task.due_s = self._capped(max(task.due_s, now + self.next_look_s(task)), now)

    def next_look_s(self, task: OpenTask) -> float:
        """How long after a look that found ``task`` still open to look again."""
        if task.running_since_s is not None:
            return self.config.poll_interval_s
        return max(self.config.queued_poll_s, self.durations(task.lane).latest_s)

    def again(self, task: OpenTask, after_s: float) -> None:
        """Put ``task`` back in line, due ``after_s`` from now."""
        task.due_s = self._clock.now() + after_s
        heapq.heappush(self._heap, task)

    def backoff_s(self, task: OpenTask) -> float:
        """How long to wait after a look at ``task`` that failed."""
        return min(self.config.max_poll_interval_s, self.config.poll_interval_s * 2 ** min(task.polls, 6) / 4)

    def forgettable(self, task: OpenTask) -> bool:
        """Whether the service may have forgotten ``task``: its lifetime has passed since it ended, or, never
        seen ended, since it was made."""
        since_s = task.ended_s if task.ended_s is not None else task.submitted_s
        return self._clock.now() >= since_s + self.config.task_lifetime_s

    def list_saves(self, due: list[OpenTask]) -> bool:
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

    # -- inside ----------------------------------------------------------------------------------------------

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


def _discard(queue: deque[OpenTask], task: OpenTask) -> None:
    for i, other in enumerate(queue):
        if other is task:
            del queue[i]
            return
