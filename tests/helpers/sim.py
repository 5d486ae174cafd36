"""Driving an in-process simulator from a test: creates sent as the engine sends them, and waits for what it
has received."""

from __future__ import annotations

import asyncio
from typing import Any

from wanbatch import catalog
from wanbatch.ledger import ItemRow
from wanbatch.service.wire import build_body
from wanbatch.sim import SimHandle

__all__ = ["post_as_the_engine_would", "task_created"]


async def post_as_the_engine_would(api: Any, row: ItemRow, *, key: str | None = None, **changes: Any) -> str:
    """POST ``row``'s async create through ``api`` (conftest's SimApi) exactly as the engine builds it (same body,
    same fingerprint), ``changes`` altering the request, with ``key`` when given; the task id."""
    offer = catalog.offer(row.region, row.model)
    body = build_body({**row.request, **changes}, api_name=offer.api_name, protocol=offer.model.protocol)
    legacy = offer.model.protocol is catalog.Protocol.LEGACY
    path = "/services/aigc/" + ("text2image/image-synthesis" if legacy else "image-generation/generation")
    status, answer = await api.call("POST", path, json=body, key=key, headers={"X-DashScope-Async": "enable"})
    assert status == 200, answer
    return answer["output"]["task_id"]


async def task_created(sim: SimHandle, count: int = 1) -> None:
    """Wait (in wall time, at most 5 s) until the simulator holds ``count`` tasks: a request in flight has arrived."""
    for _ in range(500):
        if len(sim.state.tasks) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never reached the simulator")
