"""The simulator made unkinder the way the real service and its object storage are: middlewares around
its own app that answer some requests as the real ones now and then do, and pass the rest through.

- :class:`StorageRefusals`: an image URL that works answers its first GETs with 403, 404, 410, 429 or
  503 (OSS's XML error body), chosen by a word in the item's prompt;
- :class:`UnknownAnswers`: a task query answered ``UNKNOWN`` (the service's word for a task it no longer
  knows) while the task is in fact alive, chosen by a word in the item's prompt.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from wanbatch.sim import SIM_STATE, SimConfig, SimHandle, create_app

Middleware = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[Any]]
TASK_PATH = re.compile(r"^/api/v1/tasks/(?P<task_id>[^/]+)/?$")
_OSS_CODES = {403: "AccessDenied", 404: "NoSuchKey", 410: "Gone", 429: "SlowDown", 503: "SlowDown"}


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """``app`` served on a free port of ``host`` for the block; its root URL (no slash at the end)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def sim_with(
    middlewares: Iterable[Middleware] = (),
    *,
    routes: Iterable[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = (),
    host: str = "127.0.0.1",
    **config: Any,
) -> AsyncIterator[SimHandle]:
    """The simulator's app with ``middlewares`` around it and ``routes`` beside it, on a free port of ``host``."""
    app = create_app(SimConfig(**config))
    app.middlewares.extend(middlewares)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    async with serving(app, host=host) as root:
        yield SimHandle(app, root + "/api/v1")


class Intercept:
    """A simulator middleware whose work is its ``_handle(request, handler)``; install ``self.middleware``."""

    def __init__(self) -> None:
        @web.middleware
        async def middleware(request: web.Request, handler) -> web.StreamResponse:
            return await self._handle(request, handler)

        self.middleware = middleware

    async def _handle(self, request: web.Request, handler) -> web.StreamResponse:
        return await handler(request)


def _prompt_of_task(request: web.Request, task_id: str) -> str:
    task = request.app[SIM_STATE].tasks.get(task_id)
    return task.request.prompt if task is not None and task.request is not None else ""


class StorageRefusals(Intercept):
    """The first ``times`` GETs of an image whose prompt holds a word of ``refusals`` are answered with that
    word's HTTP status; ``times=None`` refuses it for ever. ``gets`` records (path, clock time, status sent)."""

    def __init__(self, refusals: Mapping[str, int], *, times: int | None = 1) -> None:
        super().__init__()
        self.refusals, self.times = dict(refusals), times
        self.gets: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.refused: Counter[str] = Counter()

    async def _handle(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method != "GET" or not request.path.startswith("/oss/"):
            return await handler(request)
        state = request.app[SIM_STATE]
        found = state.image_at(request.path)
        prompt = found[0].request.prompt if found is not None and found[0].request is not None else ""
        status = next((code for word, code in self.refusals.items() if word in prompt), None)
        seen = self.gets[prompt]
        if status is not None and (self.times is None or len(seen) < self.times):
            seen.append((state.clock.now(), status))
            self.refused[prompt] += 1
            body = f"<Error><Code>{_OSS_CODES[status]}</Code><Message>now and then</Message></Error>"
            return web.Response(status=status, body=body.encode(), content_type="application/xml")
        response = await handler(request)
        seen.append((state.clock.now(), response.status))
        return response


class UnknownAnswers:
    """The first ``times`` queries of a task whose prompt holds ``word`` are answered UNKNOWN, as the service
    answers for a task it has forgotten; ``times=None`` answers so for ever."""

    def __init__(self, word: str, *, times: int | None = 1) -> None:
        self.word, self.times = word, times
        self.answered: Counter[str] = Counter()  #: task id -> UNKNOWN answers sent

        @web.middleware
        async def middleware(request: web.Request, handler) -> web.StreamResponse:
            match = TASK_PATH.match(request.path) if request.method == "GET" else None
            if match is None:
                return await handler(request)
            task_id = match["task_id"]
            wanted = self.times is None or self.answered[task_id] < self.times
            if wanted and self.word in _prompt_of_task(request, task_id):
                self.answered[task_id] += 1
                output = {"task_id": task_id, "task_status": "UNKNOWN"}
                body = json.dumps({"request_id": "unknown-" + task_id[:8], "output": output})
                return web.Response(body=body.encode(), content_type="application/json")
            return await handler(request)

        self.middleware = middleware
