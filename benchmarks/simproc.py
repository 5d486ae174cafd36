"""The simulator as its own process, observed: ``wanbatch sim`` plus one read-only statistics route.

    python -m benchmarks.simproc --port 0 --speed 400 --config sim.yaml

It serves the app of :func:`wanbatch.sim.create_app` from the same config file
``wanbatch sim --config`` reads, and prints the same first line
(``wanbatch sim: http://127.0.0.1:PORT/api/v1``). A middleware watches every
answer and keeps, per account, what the benchmark needs and the simulator
does not count per account: requests by endpoint and status, when each 429
fell, when the first create arrived, which query or task list first reported
each task's end (the *detection* of that end), and when the last image was fetched. All
times are on the simulator's clock, so a makespan or a lag needs no clock
shared with the client. ``GET /bench/stats`` returns it as JSON.

Running it in a process of its own keeps its CPU out of the client's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from wanbatch.aio import stop_on_signals
from wanbatch.sim import SIM_STATE, SimConfig, create_app

__all__ = ["AccountWatch", "endpoint_of", "main", "observed_app"]

API = "/api/v1"
STATS_PATH = "/bench/stats"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


@dataclass(slots=True)
class AccountWatch:
    """What one account's client did, as the service saw it."""

    requests: Counter = field(default_factory=Counter)  #: by endpoint
    statuses: Counter = field(default_factory=Counter)  #: by "endpoint status"
    first_request_mono: float | None = None  #: time.monotonic() (system-wide, comparable across processes)
    last_request_mono: float | None = None
    first_create_mono: float | None = None
    first_create_s: float | None = None  #: simulator clock
    throttled_s: list[float] = field(default_factory=list)  #: simulator clock of each 429 answer to a create
    detected_s: dict[str, float] = field(default_factory=dict)  #: task id -> first query that saw it ended
    query_answers: Counter = field(default_factory=Counter)  #: the task status each query reported
    first_image_s: float | None = None
    last_image_s: float | None = None
    images_ok: int = 0

    def saw(self, endpoint: str, status: int, now_s: float, mono: float) -> None:
        self.requests[endpoint] += 1
        self.statuses[f"{endpoint} {status}"] += 1
        self.first_request_mono = self.first_request_mono or mono
        self.last_request_mono = mono
        if endpoint in ("create", "sync"):
            if self.first_create_s is None:
                self.first_create_s, self.first_create_mono = now_s, mono
            if status == 429:
                self.throttled_s.append(now_s)
        elif endpoint == "image" and status == 200:
            self.images_ok += 1
            self.first_image_s = self.first_image_s or now_s
            self.last_image_s = now_s


def endpoint_of(method: str, path: str) -> str:
    """The simulator's endpoint names (create, sync, query, list, cancel, image) for a request line."""
    if path.startswith("/oss/"):
        return "image"
    rest = path[len(API) :].strip("/") if path.startswith(API) else ""
    if rest.startswith("services/"):
        return "sync" if "multimodal-generation" in rest else "create" if method == "POST" else "other"
    parts = rest.split("/")
    if parts[0] != "tasks":
        return "other"
    if len(parts) == 1:
        return "list"
    return "cancel" if parts[-1] == "cancel" else "query"


def observed_app(config: SimConfig) -> web.Application:
    """The simulator's app with the watching middleware and the statistics route."""
    app = create_app(config)
    state = app[SIM_STATE]
    watches: dict[str, AccountWatch] = defaultdict(AccountWatch)
    cpu0 = time.process_time()

    def account_of(request: web.Request, endpoint: str) -> str:
        if endpoint == "image":
            found = state.image_at(request.path)
            return found[0].account if found else "?"
        try:
            return state.accounts.authenticate(request.headers.get("Authorization")).account
        except Exception:  # a refused key is an answer like any other; it belongs to nobody
            return "?"

    @web.middleware
    async def watch(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path == STATS_PATH:
            return await handler(request)
        response = await handler(request)
        endpoint = endpoint_of(request.method, request.path)
        now_s, mono = state.clock.now(), time.monotonic()
        account = watches[account_of(request, endpoint)]
        account.saw(endpoint, response.status, now_s, mono)
        if endpoint == "query" and response.status == 200 and isinstance(response, web.Response):
            task_id, status = request.match_info.get("task_id", ""), _status_in(response.body)
            account.query_answers[status] += 1
            if task_id not in account.detected_s and status in TERMINAL:
                account.detected_s[task_id] = now_s
        elif endpoint == "list" and response.status == 200 and isinstance(response, web.Response):
            # A page of the task list that shows a task ended tells the client as much as a query would.
            for task_id, status in _listed(response.body):
                if task_id not in account.detected_s and status in TERMINAL:
                    account.detected_s[task_id] = now_s
        return response

    async def stats(request: web.Request) -> web.Response:
        state.materialise()
        body = {
            "now_s": state.clock.now(),
            "speed": state.clock.speed,
            "cpu_s": time.process_time() - cpu0,
            "requests": dict(state.requests),
            "accounts": {name: _account_stats(state, name, watch) for name, watch in watches.items()},
        }
        return web.json_response(body)

    app.middlewares.append(watch)
    app.router.add_get(STATS_PATH, stats)
    return app


def _status_in(body: Any) -> str:
    try:
        return (json.loads(body).get("output") or {}).get("task_status", "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _listed(body: Any) -> list[tuple[str, str]]:
    """(task id, status) of each entry of a task list answer."""
    try:
        entries = json.loads(body).get("data") or []
        return [(str(e.get("task_id")), str(e.get("status"))) for e in entries if isinstance(e, dict)]
    except (TypeError, ValueError, AttributeError):
        return []


def _account_stats(state: Any, name: str, watch: AccountWatch) -> dict[str, Any]:
    """One account's watch plus its tasks' plan (start, end, duration) as the simulator drew it."""
    tasks = [task for task in state.tasks.values() if task.account == name]
    ended = [task for task in tasks if task.end_s <= state.clock.now() and task.canceled_s is None]
    lags = [watch.detected_s[t.task_id] - t.end_s for t in ended if t.task_id in watch.detected_s]
    return {
        "requests": dict(watch.requests),
        "statuses": dict(watch.statuses),
        "query_answers": dict(watch.query_answers),
        "first_request_mono": watch.first_request_mono,
        "last_request_mono": watch.last_request_mono,
        "first_create_mono": watch.first_create_mono,
        "first_create_s": watch.first_create_s,
        "throttled_s": watch.throttled_s,
        "first_image_s": watch.first_image_s,
        "last_image_s": watch.last_image_s,
        "images_ok": watch.images_ok,
        "tasks": len(tasks),
        "tasks_ended": len(ended),
        "tasks_detected": len(lags),
        "run_s_total": sum(task.duration_s for task in tasks),
        "run_s_max": max((task.duration_s for task in tasks), default=0.0),
        "last_end_s": max((task.end_s for task in tasks), default=None),
        "images_billed": sum(len(task.succeeded_images) for task in ended),
        "lags_s": lags,
    }


async def _serve(args: argparse.Namespace) -> int:
    config = SimConfig(speed=args.speed, seed=args.seed, config_file=args.config)
    app = observed_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"wanbatch sim: http://127.0.0.1:{port}{API}", flush=True)
    stop = stop_on_signals()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simproc", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path)
    return asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
