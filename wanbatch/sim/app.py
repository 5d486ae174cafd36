"""The simulator as an ``aiohttp.web`` application: routes, image serving, lifecycle.

Every path exists with and without a trailing slash, since the SDK's aio
client adds one (spec §8). Result images are served from the same host under
``/oss/``, the way OSS would: no API key, a signed URL, XML errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from wanbatch.clock import Clock, ScaledClock
from wanbatch.sim import respond, wire
from wanbatch.sim.config import SimConfig
from wanbatch.sim.faults import Fault
from wanbatch.sim.images import ImageKey
from wanbatch.sim.service import Handler, Service
from wanbatch.sim.state import SimState
from wanbatch.sim.tasks import Endpoint

__all__ = ["SIM_STATE", "create_app"]

#: Where the app keeps its :class:`SimState`: ``app[SIM_STATE]``.
SIM_STATE = web.AppKey("wanbatch_sim_state", SimState)

_EXPIRED = "Request has expired."
TICK_S = 0.05  #: wall seconds between materialisations (billing log written as time passes)
API = "/api/v1"


def create_app(config: SimConfig | None = None, *, clock: Clock | None = None) -> web.Application:
    """The simulated service for ``config`` (a config file in it is read now); its state is ``app[SIM_STATE]``.

    ``clock``: the service's time, instead of one at ``config.speed`` (a test's manual clock, say)."""
    config = (config or SimConfig()).resolved()
    state = SimState(config, clock=clock or ScaledClock(speed=config.speed))
    service = Service(state)
    app = web.Application(client_max_size=1 << 20)
    app[SIM_STATE] = state

    def api(name: str, run: Handler, **kwargs: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await service.handle(request, name, run, **kwargs)

        return handler

    routes = [
        ("POST", "/services/aigc/text2image/image-synthesis", api("create", service.creator(Endpoint.LEGACY))),
        ("POST", "/services/aigc/image-generation/generation", api("create", service.creator(Endpoint.ASYNC))),
        (
            "POST",
            "/services/aigc/multimodal-generation/generation",
            api("sync", service.creator(Endpoint.SYNC), sync=True),
        ),
        ("GET", "/tasks", api("list", service.list, read_kind="list")),
        ("GET", "/tasks/{task_id}", api("query", service.query, read_kind="query")),
        ("POST", "/tasks/{task_id}/cancel", api("cancel", service.cancel, read_kind="cancel")),
        ("POST", "/services/{tail:.*}", api("other", _wrong_url)),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, API + path, handler)
        app.router.add_route(method, API + path + "/", handler)
    app.router.add_get("/oss/{tail:.+}", _image_handler(state))
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_wake_sleepers)
    return app


async def _wrong_url(request: web.Request, caller: object, request_id: str, may_fault: bool) -> tuple[int, dict]:
    raise wire.SimError(400, "InvalidParameter", wire.URL_ERROR)


def _image_handler(state: SimState) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def image(request: web.Request) -> web.StreamResponse:
        state.requests["image"] += 1
        state.materialise()
        path, expires, signature = request.path, request.query.get("Expires", ""), request.query.get("Signature", "")
        now = state.clock.now()
        if expires.isdigit() and now > int(expires):
            return _oss_error(state, 403, "AccessDenied", _EXPIRED, now, expires)
        if not state.images.signature_ok(path, expires, signature):
            message = "The request signature we calculated does not match the signature you provided."
            return _oss_error(state, 403, "SignatureDoesNotMatch", message, now, expires)
        found = state.image_at(path)
        if found is None or not found[0].images[found[1]].ok or found[0].request is None:
            return _oss_error(state, 404, "NoSuchKey", "The specified key does not exist.", now, expires)
        transient = _transient_error(state, path)
        if transient is not None:
            return _oss_error(state, *transient, now, expires)
        task, index = found
        spec = task.request
        key = ImageKey(spec.prompt, spec.seed + index, spec.width, spec.height, spec.watermark)
        data = await state.images.png(key)
        headers = {"Content-Type": "image/png", "ETag": f'"{task.task_id}-{index}"', "Server": "AliyunOSS"}
        return await respond.send(request, state, "image", 200, data, headers, state.faults.draw_download())

    return image


#: Object-storage errors a client may meet once on a live object (OSS answers them under load or while an
#: object replicates): fault -> (HTTP status, code, message).
_TRANSIENT = {
    Fault.IMAGE_SLOWDOWN: (503, "SlowDown", "Please reduce your request rate."),
    Fault.IMAGE_NOT_FOUND: (404, "NoSuchKey", "The specified key does not exist."),
    Fault.IMAGE_DENIED: (403, "AccessDenied", "You have no right to access this object."),
}


def _transient_error(state: SimState, path: str) -> tuple[int, str, str] | None:
    """The error of an image's first GET when an image fault falls on it; later GETs of the URL work."""
    if not state.first_get(path):
        return None
    fault = state.faults.draw_image()
    if fault is None:
        return None
    state.faults_injected[fault] += 1
    return _TRANSIENT[fault]


def _oss_error(state: SimState, status: int, code: str, message: str, now_s: float, expires: str) -> web.Response:
    """OSS's XML error body, as a browser or HTTP client would see it."""
    state.statuses[("image", status)] += 1
    server_time = dt.datetime.fromtimestamp(now_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    extra = ""
    if message == _EXPIRED and expires.isdigit():
        expired_at = dt.datetime.fromtimestamp(int(expires), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        extra = f"  <Expires>{expired_at}</Expires>\n  <ServerTime>{server_time}</ServerTime>\n"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
        f"  <RequestId>{wire.new_request_id().replace('-', '').upper()[:24]}</RequestId>\n"
        f"  <HostId>{state.config.region}.oss.simulated</HostId>\n{extra}</Error>\n"
    )
    return web.Response(status=status, body=body.encode(), headers={"Content-Type": "application/xml"})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the billing log and run the ticker while the app serves."""
    state = app[SIM_STATE]
    state.bind_loop()
    state.billing.open()
    ticker = asyncio.create_task(_tick(state))
    yield
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    state.materialise()
    state.billing.close()
    if state.store is not None:
        state.store.close()


async def _tick(state: SimState) -> None:
    while True:
        state.materialise()
        await asyncio.sleep(TICK_S)


async def _wake_sleepers(app: web.Application) -> None:
    """At shutdown, held answers stop waiting so the server can close promptly."""
    state = app[SIM_STATE]
    state.closing = True
    state.notify()
