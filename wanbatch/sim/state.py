"""The simulated service's memory: tasks, lanes, result objects, billing, counters.

Everything here runs on the event loop's thread and costs O(1) or O(log n)
per request, except a cancel (which re-plans the queue behind it) and a list
(which reads the tasks of its time window). Time-driven effects (billing when
a task ends, forgetting tasks past their lifetime) are *materialised* from a
heap of due events: at the start of every request, on every read of the
billing records, and by a ticker every 50 ms of wall time so that the billing
log file is written as simulated time passes.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
import random
import secrets
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

from wanbatch import catalog
from wanbatch.clock import Clock, ScaledClock
from wanbatch.sim import wire
from wanbatch.sim.accounts import Accounts, ApiKey
from wanbatch.sim.billing import BillingLog
from wanbatch.sim.config import SimConfig
from wanbatch.sim.faults import IMAGE_FAULTS, Fault, FaultInjector
from wanbatch.sim.images import ImageStore
from wanbatch.sim.persist import Saved, SimStore, task_record
from wanbatch.sim.tasks import Endpoint, GenerationRequest, ImageResult, Lane, Task, TaskStatus

__all__ = ["SimState"]

_BUCKETS = {"beijing": "dashscope-result-bj", "singapore": "dashscope-result-sgp", "virginia": "dashscope-result-us"}


class _AccountTasks:
    """One account's listable tasks in submit order, for time-window lookups."""

    def __init__(self) -> None:
        self._items: list[Task] = []
        self._start = 0  #: tasks before this index have been forgotten

    def add(self, task: Task) -> None:
        # A neighbour's task may be made with a submit time a little in the past: keep the order by time.
        bisect.insort(self._items, task, lo=self._start, key=lambda t: t.submit_s)

    def forget(self, task: Task) -> None:
        if self._start < len(self._items) and self._items[self._start] is task:
            self._start += 1
            if self._start > 1024 and self._start * 2 > len(self._items):
                del self._items[: self._start]
                self._start = 0

    def newest_first(self, lo_s: float, hi_s: float) -> Iterator[Task]:
        """Tasks submitted in [lo_s, hi_s], newest first."""
        lo = bisect.bisect_left(self._items, lo_s, lo=self._start, key=lambda t: t.submit_s)
        hi = bisect.bisect_right(self._items, hi_s, lo=lo, key=lambda t: t.submit_s)
        return (self._items[i] for i in range(hi - 1, lo - 1, -1))


class SimState:
    """The simulator's state; handlers call it, tests read it through ``SimHandle``."""

    def __init__(self, config: SimConfig, *, clock: Clock) -> None:
        if config.state_dir is not None and not isinstance(clock, ScaledClock):
            raise ValueError("a simulator kept in a state folder runs on a scaled clock: its time outlives the process")
        self.config = config
        self.clock = clock
        self.accounts = Accounts(config)
        self.faults = FaultInjector(profile=config.faults, rates=config.fault_rates, seed=config.seed)
        self.billing = BillingLog(config.billing_log)
        self.store = SimStore(config.state_dir) if config.state_dir is not None else None
        if self.store is not None:
            self.store.lock()  # before reading: a second process must not rewrite the file under the first
        saved = self.store.load() if self.store is not None else Saved()
        secret = bytes.fromhex(saved.meta["secret"]) if "secret" in saved.meta else secrets.token_bytes(32)
        self.images = ImageStore(secret=secret)
        self.port: int | None = saved.meta.get("port")  #: the port served (an earlier process's, until bound)
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.tasks: dict[str, Task] = {}
        self.closing = False
        self._lanes: dict[tuple[str, str], Lane] = {}
        self._listable: dict[str, _AccountTasks] = {}
        self._in_order: deque[Task] = deque()
        self._objects: dict[str, tuple[Task, int]] = {}
        self._due: list[tuple[float, int, int, Task]] = []
        self._later: list[tuple[float, int, Callable[[float], None]]] = []  #: actions due at a time
        self._fetched: set[str] = set()  #: image paths already asked for once
        self._seq = itertools.count()
        self._durations = random.Random(f"{config.seed}/durations")
        self._outcomes = random.Random(f"{config.seed}/outcomes")
        self.seeds = random.Random(f"{config.seed}/seeds")
        # Neighbours' tasks draw from streams of their own, so that switching them on leaves ours as they were.
        self._neighbour_durations = random.Random(f"{config.seed}/neighbours/durations")
        self._neighbour_outcomes = random.Random(f"{config.seed}/neighbours/outcomes")
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        if self.store is not None:
            self._restore(saved)

    # --- lifecycle of tasks

    def submit(
        self,
        *,
        caller: ApiKey,
        offer: catalog.Offer,
        endpoint: Endpoint,
        fingerprint: str,
        request_id: str,
        request: GenerationRequest | None,
        error: wire.SimError | None = None,
        n: int = 0,
        at_s: float | None = None,
        backdate_s: float = 0.0,
        neighbour: bool = False,
        echo: str | None = None,
        sent_s: float | None = None,
    ) -> Task:
        """Create a task and plan its life. ``error`` makes a task that FAILED at once (``param_errors="task"``).

        ``at_s`` is the instant it is made (a due action's time; now when None); ``backdate_s`` moves its submit
        time that much earlier without moving its place in the queue (a neighbour made just before ours).
        """
        now = self.clock.now() if at_s is None else at_s
        task = Task(
            task_id=str(uuid.uuid4()),
            request_id=request_id,
            account=caller.account,
            key_id=caller.key_id,
            offer=offer,
            endpoint=endpoint,
            fingerprint=fingerprint,
            request=request,
            submit_s=now - backdate_s,
            duration_s=0.0,
            images=(),
            start_s=now,
            end_s=now,
            neighbour=neighbour,
            sent_s=now - backdate_s if sent_s is None else sent_s,
            echo=echo,
        )
        if request is None:
            message = error.message if error else ""
            task.images = tuple(ImageResult(i, 0, False, "InvalidParameter", message) for i in range(n))
        else:
            task.images = self._outcomes_for(request, neighbour=neighbour)
            task.duration_s = self._draw_duration(offer.model, neighbour=neighbour)
            task.url_ttl_s = self.config.url_ttl_s if neighbour else self._url_ttl_s()
            self._lane(caller.account, offer).schedule(task, now)
            heapq.heappush(self._due, (task.end_s, next(self._seq), task.version, task))
        task.object_keys = self._object_paths(task)
        for index, path in enumerate(task.object_keys):
            self._objects[path] = (task, index)
        task.listed_s = task.submit_s
        if not task.sync and self.faults.hits(Fault.LIST_LAG):
            self.faults_injected[Fault.LIST_LAG] += 1
            task.listed_s += self.config.list_lag_s
        self._remember(task)
        self._save(task)
        return task

    def _remember(self, task: Task) -> None:
        self.tasks[task.task_id] = task
        self._in_order.append(task)
        if not task.sync:
            self._listable.setdefault(task.account, _AccountTasks()).add(task)

    def call_at(self, at_s: float, action: Callable[[float], None]) -> None:
        """Run ``action(at_s)`` once the simulated clock reaches ``at_s``, even if no request comes."""
        heapq.heappush(self._later, (at_s, next(self._seq), action))

    def cancel(self, task: Task) -> bool:
        """Cancel ``task`` if it is PENDING now; the tasks queued behind it move up."""
        now = self.clock.now()
        if self.status(task) is not TaskStatus.PENDING:
            return False
        for moved in self._lane(task.account, task.offer).cancel(task, now):
            heapq.heappush(self._due, (moved.end_s, next(self._seq), moved.version, moved))
            self._save(moved)
        self._save(task)
        self.notify()
        return True

    def status(self, task: Task) -> TaskStatus:
        return task.status_at(self.clock.now(), self.config.task_ttl_s)

    def find(self, task_id: str, caller: ApiKey) -> Task | None:
        """The caller's account's task, or None (unknown, another account's, a sync call, or forgotten)."""
        task = self.tasks.get(task_id)
        if task is None or task.sync or task.account != caller.account:
            return None
        return None if self.status(task) is TaskStatus.UNKNOWN else task

    def listing(self, caller: ApiKey, lo_s: float, hi_s: float) -> Iterator[Task]:
        """The caller's account's live tasks submitted in [lo_s, hi_s] that the list shows by now, newest first."""
        tasks = self._listable.get(caller.account)
        if tasks is None:
            return iter(())
        return (t for t in tasks.newest_first(lo_s, hi_s) if self.listed(t))

    def listed(self, task: Task) -> bool:
        """Whether ``GET /tasks`` shows ``task`` now (past its list lag, not forgotten)."""
        return self.clock.now() >= task.listed_s and self.status(task) is not TaskStatus.UNKNOWN

    def first_get(self, path: str) -> bool:
        """Whether this is the first GET of the image at ``path`` (counting this one); remembered only while an
        image fault is switched on, the only thing that asks."""
        if path in self._fetched or not self.faults.any_on(IMAGE_FAULTS):
            return False
        self._fetched.add(path)
        return True

    def image_at(self, path: str) -> tuple[Task, int] | None:
        return self._objects.get(path)

    def _lane(self, account: str, offer: catalog.Offer) -> Lane:
        lane = self._lanes.get((account, offer.model.name))
        if lane is None:
            _, concurrency = self.accounts.quota(account, offer.model, offer)
            lane = self._lanes[(account, offer.model.name)] = Lane(concurrency)
        return lane

    def _draw_duration(self, model: catalog.Model, *, neighbour: bool) -> float:
        mean, spread = self.config.mean_duration_s(model), self.config.duration_spread
        if mean == 0 or spread == 0 or self.config.duration_distribution == "fixed":
            return mean
        rng = self._neighbour_durations if neighbour else self._durations
        if self.config.duration_distribution == "lognormal":
            return rng.lognormvariate(math.log(mean) - spread**2 / 2, spread)
        return mean * rng.uniform(max(0.0, 1 - spread), 1 + spread)

    def _outcomes_for(self, request: GenerationRequest, *, neighbour: bool) -> tuple[ImageResult, ...]:
        text = request.prompt.lower()
        if any(word.lower() in text for word in self.config.output_inspection_words):
            code, message = "DataInspectionFailed", wire.OUTPUT_INSPECTION
            return tuple(ImageResult(i, request.seed + i, False, code, message) for i in range(request.n))
        results, rng = [], self._neighbour_outcomes if neighbour else self._outcomes
        for i in range(request.n):
            if rng.random() < self.config.image_failure_rate:
                if rng.random() < 0.5:
                    code, message = "InternalError.Timeout", wire.INTERNAL_TIMEOUT
                else:
                    code, message = "DataInspectionFailed", wire.OUTPUT_INSPECTION
                results.append(ImageResult(i, request.seed + i, False, code, message))
            else:
                results.append(ImageResult(i, request.seed + i, True))
        return tuple(results)

    def _url_ttl_s(self) -> float:
        if self.faults.expires_early():
            self.faults_injected[Fault.EARLY_EXPIRY] += 1
            return self.config.early_expiry_s
        return self.config.url_ttl_s

    def _object_paths(self, task: Task) -> tuple[str, ...]:
        day = wire.format_time(task.submit_s)[:10].replace("-", "")
        stem = f"/oss/{_BUCKETS[self.config.region]}/{day}/{uuid.uuid4()}"
        return tuple(f"{stem}-{i + 1}.png" for i in range(task.n))

    # --- kept in a folder (config.state_dir)

    def _restore(self, saved: Saved) -> None:
        """Continue what an earlier process left in the folder: its clock, its tasks and what was billed."""
        meta = saved.meta
        if "reading_s" in meta:
            # One timeline across processes: the time the simulator was stopped passes, as it does for a service.
            self.clock.continue_from(meta["reading_s"], meta["wall_s"])
        billed = self.billing.load()
        for task in saved.tasks:
            for index, path in enumerate(task.object_keys):
                self._objects[path] = (task, index)
            self._remember(task)
            if task.request is None or task.canceled_s is not None:
                continue
            self._lane(task.account, task.offer).restore(task)
            if task.task_id not in billed:  # ended while no process ran (billed now, at its end time) or later
                heapq.heappush(self._due, (task.end_s, next(self._seq), task.version, task))
        self.save_meta()

    def save_meta(self) -> None:
        """Record the secret, the port and where the clock stands, for a simulator started again in the folder."""
        if self.store is None:
            return
        assert isinstance(self.clock, ScaledClock)  # checked when the state was made
        reading_s, wall_s = self.clock.anchor()
        secret = self.images.secret.hex()
        speed = self.clock.speed
        self.store.write(
            {
                "kind": "meta",
                "secret": secret,
                "port": self.port,
                "speed": speed,
                "reading_s": reading_s,
                "wall_s": wall_s,
            }
        )

    def _save(self, task: Task) -> None:
        if self.store is not None:
            self.store.write(task_record(task))

    # --- time-driven effects

    def materialise(self) -> None:
        """Run the actions due by now, bill the tasks that have ended and forget those past their lifetime."""
        now = self.clock.now()
        while self._later and self._later[0][0] <= now:
            at_s, _, action = heapq.heappop(self._later)
            action(at_s)
        while self._due and self._due[0][0] <= now:
            _, _, version, task = heapq.heappop(self._due)
            if version == task.version and task.canceled_s is None:
                self.billing.bill(task)
        ttl = self.config.task_ttl_s
        while self._in_order and now >= max(self._in_order[0].gone_s(ttl), self._in_order[0].url_expires_s):
            task = self._in_order.popleft()
            self.tasks.pop(task.task_id, None)
            for path in task.object_keys:
                self._objects.pop(path, None)
                self._fetched.discard(path)
            if not task.sync:
                self._listable[task.account].forget(task)

    def billing_records(self) -> list[dict[str, Any]]:
        self.materialise()
        return list(self.billing.records)

    # --- waiting in simulated time

    def bind_loop(self) -> None:
        """Remember the loop serving this state, so that other threads can wake its sleepers safely."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def notify(self) -> None:
        """Bring effects up to date and wake every sleeper to re-read the clock.

        Called after a clock jump, a speed change, a re-plan and at close; safe from any thread.
        """
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.notify)
            return
        self.materialise()
        self.save_meta()  # the clock may have jumped or changed speed
        woken, self._wake = self._wake, asyncio.Event()
        woken.set()

    async def sleep_until(self, deadline_s: float) -> bool:
        """Sleep until the simulated clock reads ``deadline_s``; False if the simulator closes first."""
        while not self.closing:
            remaining = deadline_s - self.clock.now()
            if remaining <= 0:
                return True
            await self.clock.wait_event(self._wake, remaining)
        return False
