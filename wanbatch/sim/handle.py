"""Running a simulator in-process: :func:`running_sim` and the control handle it yields.

    async with running_sim(SimConfig(speed=60)) as sim:
        ...  # point a client at sim.base_url with key "sk-sim-beijing"
        sim.advance(120)  # two simulated minutes pass at once
        assert len(sim.billing) == 4

Call the handle from the event loop's thread (``advance`` and ``set_speed``
are also safe from other threads).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from wanbatch.clock import Clock, ManualClock, ScaledClock
from wanbatch.sim.app import SIM_STATE, create_app
from wanbatch.sim.config import SimConfig
from wanbatch.sim.state import SimState
from wanbatch.sim.tasks import Endpoint, Task, TaskStatus

__all__ = ["SimHandle", "TaskView", "running_sim"]

SHUTDOWN_TIMEOUT_S = 2.0

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskView:
    """A task as tests see it, read at one instant."""

    task_id: str
    status: TaskStatus
    model: str
    n: int
    endpoint: Endpoint
    account: str
    key_id: str
    fingerprint: str
    prompt: str  #: after truncation ("" when the parameters were invalid)
    seed: int
    size: str
    submit_s: float
    start_s: float
    end_s: float
    images_ok: int
    url_expires_s: float
    neighbour: bool  #: made by a simulated neighbour on the account, not by a client
    sent_s: float  #: when its create reached the simulator (earlier than ``landed_s`` for a late create)
    landed_s: float  #: when the task was made (its ``submit_s``, ``gmt_create`` and ``submit_time``)
    listed_s: float  #: from when ``GET /tasks`` shows it (later than ``landed_s`` under list lag)
    orig_prompt: str  #: what its results echo as ``orig_prompt`` (the prompt, unless an echo variant fell on it)


class SimHandle:
    """Control and observation of a running simulator."""

    def __init__(self, app: web.Application, base_url: str) -> None:
        self.app = app
        self.base_url = base_url  #: ``http://127.0.0.1:PORT/api/v1``
        self._state: SimState = app[SIM_STATE]

    @property
    def state(self) -> SimState:
        return self._state

    @property
    def config(self) -> SimConfig:
        return self._state.config

    @property
    def clock(self) -> Clock:
        return self._state.clock

    def advance(self, seconds: float) -> None:
        """Jump simulated time forward; tasks, quotas, expiries and held answers all follow."""
        clock = self.clock
        assert isinstance(clock, ManualClock | ScaledClock)
        clock.advance(seconds)
        self._state.notify()

    def set_speed(self, speed: float) -> None:
        clock = self.clock
        if not isinstance(clock, ScaledClock):
            raise TypeError("only a scaled clock has a speed; a manual one is advanced")
        clock.set_speed(speed)
        self._state.notify()

    def set_faults(self, profile: str | None = None, **rates: float) -> None:
        """Switch to fault ``profile`` (dropping earlier rates) or keep it (None); ``rates`` override per fault."""
        self._state.faults.set(profile, **rates)

    @property
    def billing(self) -> list[dict[str, Any]]:
        """The billing records so far (same fields as the billing log's lines)."""
        return self._state.billing_records()

    @property
    def requests(self) -> Counter[str]:
        """Requests by endpoint: create, sync, query, list, cancel, image (and other: unknown service paths)."""
        return self._state.requests

    @property
    def statuses(self) -> Counter[tuple[str, int]]:
        """Answers by (endpoint, HTTP status); status 0 = connection closed without an answer."""
        return self._state.statuses

    @property
    def faults_injected(self) -> Counter[str]:
        return self._state.faults_injected

    @property
    def tasks(self) -> Mapping[str, TaskView]:
        """Every task the simulator remembers, sync calls included, as read now."""
        self._state.materialise()
        return {task_id: self._view(task) for task_id, task in self._state.tasks.items()}

    @property
    def our_tasks(self) -> Mapping[str, TaskView]:
        """The tasks clients made (``tasks`` without the neighbours')."""
        return {task_id: view for task_id, view in self.tasks.items() if not view.neighbour}

    @property
    def neighbour_tasks(self) -> Mapping[str, TaskView]:
        """The tasks simulated neighbours made on the clients' accounts."""
        return {task_id: view for task_id, view in self.tasks.items() if view.neighbour}

    def _view(self, task: Task) -> TaskView:
        request = task.request
        return TaskView(
            task_id=task.task_id,
            status=self._state.status(task),
            model=task.model,
            n=task.n,
            endpoint=task.endpoint,
            account=task.account,
            key_id=task.key_id,
            fingerprint=task.fingerprint,
            prompt=request.prompt if request else "",
            seed=request.seed if request else 0,
            size=request.size if request else "",
            submit_s=task.submit_s,
            start_s=task.start_s,
            end_s=task.end_s,
            images_ok=len(task.succeeded_images),
            url_expires_s=task.url_expires_s,
            neighbour=task.neighbour,
            sent_s=task.sent_s,
            landed_s=task.submit_s,
            listed_s=task.listed_s,
            orig_prompt=task.orig_prompt,
        )


@contextlib.asynccontextmanager
async def running_sim(
    config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0, clock: Clock | None = None
) -> AsyncIterator[SimHandle]:
    """Serve a simulator on ``host:port`` (0 = a free port) for the duration of the block.

    A simulator started again in its ``state_dir`` takes the port it served before when ``port`` is 0, since the
    result URLs it handed out name that port; if another process holds it now, a free one is taken instead.
    """
    app = create_app(config, clock=clock)
    state = app[SIM_STATE]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port or state.port or 0).start()
        except OSError:
            if port or not state.port:
                raise
            log.warning("simulator: port %d of its earlier run is taken; its old result URLs fail", state.port)
            await web.TCPSite(runner, host, 0).start()
        bound_host, bound_port = runner.addresses[0][:2]
        if state.store is not None and state.port != bound_port:
            state.port = bound_port
            state.save_meta()
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield SimHandle(app, f"http://{shown_host}:{bound_port}/api/v1")
    finally:
        await runner.cleanup()
