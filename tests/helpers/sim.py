"""Watching an in-process simulator from a test that drives it over HTTP."""

from __future__ import annotations

import asyncio

from wanbatch.sim import SimHandle

__all__ = ["task_created"]


async def task_created(sim: SimHandle, count: int = 1) -> None:
    """Wait (in wall time, at most 5 s) until the simulator holds ``count`` tasks: a request in flight has arrived."""
    for _ in range(500):
        if len(sim.state.tasks) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never reached the simulator")
