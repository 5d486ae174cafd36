"""Shared fixtures. Each section belongs to the module it serves."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from wanbatch.clock import ManualClock
from wanbatch.sim import SimConfig, SimHandle, running_sim

#: The S3 server's fixtures (``seaweed``, ``bucket``, ``s3_env``), for the tests of stores and of runs into them;
#: ``run_ledger``, an opened ledger of each implementation, for the tests of the ledger's protocol; the PostgreSQL
#: server's (``postgres_server``, ``pg_url``), for the tests of the PostgreSQL ledger.
pytest_plugins = ["helpers.seaweed", "helpers.run_ledger", "helpers.postgres"]

# --- the simulator (wanbatch.sim) -------------------------------------------------------------------


@pytest.fixture
async def start_sim() -> AsyncIterator[Callable[..., Awaitable[SimHandle]]]:
    """Start simulators from SimConfig keywords; all stop after the test. Without a ``speed``, the simulator's
    clock is a manual one, starting at the wall's time and moving only when the test advances it."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**config: Any) -> SimHandle:
            clock = None if "speed" in config else ManualClock(start_s=time.time())
            return await stack.enter_async_context(running_sim(SimConfig(**config), clock=clock))

        yield start


@pytest.fixture
async def sim(start_sim: Callable[..., Awaitable[SimHandle]]) -> SimHandle:
    """A Beijing simulator on a manual clock, no faults, seed 0."""
    return await start_sim()


@pytest.fixture
async def sim_http() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp client session for the simulator tests."""
    async with aiohttp.ClientSession() as session:
        yield session


class SimApi:
    """Raw calls to a simulator's API: each returns (HTTP status, parsed JSON or text)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str = "sk-sim-beijing") -> None:
        self.session, self.base_url, self.key = session, base_url, key

    async def call(
        self, method: str, path: str, *, key: str | None = None, headers: dict | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {key or self.key}", **(headers or {})}
        async with self.session.request(method, self.base_url + path, headers=sent, **kwargs) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return response.status, json.loads(text) if is_json else text

    async def create(self, model: str = "wan2.2-t2i-flash", prompt: str = "a cat", **params: Any) -> tuple[int, Any]:
        """An async create on the model's endpoint, with ``params`` as ``parameters``."""
        if model.startswith("wan2.6"):
            path = "/services/aigc/image-generation/generation"
            body = {"model": model, "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]}}
        else:
            path, body = "/services/aigc/text2image/image-synthesis", {"model": model, "input": {"prompt": prompt}}
        body["parameters"] = params
        return await self.call("POST", path, json=body, headers={"X-DashScope-Async": "enable"})

    async def task_id(self, model: str = "wan2.2-t2i-flash", prompt: str = "a cat", **params: Any) -> str:
        status, body = await self.create(model, prompt, **params)
        assert status == 200, body
        return body["output"]["task_id"]

    async def query_full(self, task_id: str) -> dict:
        """The whole query body (output, usage, request_id)."""
        status, body = await self.call("GET", f"/tasks/{task_id}")
        assert status == 200, body
        return body

    async def query(self, task_id: str) -> dict:
        return (await self.query_full(task_id))["output"]

    async def cancel(self, task_id: str) -> tuple[int, Any]:
        return await self.call("POST", f"/tasks/{task_id}/cancel")

    async def list(self, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", "/tasks", params={k: str(v) for k, v in params.items()})


@pytest.fixture
def sim_api_for(sim_http: aiohttp.ClientSession) -> Callable[..., SimApi]:
    """``sim_api_for(sim, key=...)``: raw API calls to a simulator (Beijing demo key unless told)."""
    return lambda sim, key="sk-sim-beijing": SimApi(sim_http, sim.base_url, key)


@pytest.fixture
def sim_api(sim: SimHandle, sim_api_for: Callable[..., SimApi]) -> SimApi:
    """Raw API calls to the ``sim`` fixture's simulator with the Beijing demo key."""
    return sim_api_for(sim)
