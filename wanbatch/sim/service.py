"""The API endpoints of spec §1.2, one method each, behind one common request path.

:meth:`Service.handle` is that path: count the request, bring time-driven
effects up to date, draw the request's fault, authenticate, apply the
injected and real quotas, run the endpoint, and answer through
``respond.send`` (which applies an *after* fault). Endpoints return
``(status, body)``, raise ``wire.SimError``, or raise :class:`Dropped` to
close the connection unanswered. An endpoint told that the API stream left
its request alone may apply a service fault of its own (faults.SERVICE_FAULTS).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from wanbatch import catalog
from wanbatch.sim import bodies, respond, validate, wire
from wanbatch.sim.accounts import ApiKey
from wanbatch.sim.faults import BEFORE_FAULTS, Fault
from wanbatch.sim.neighbours import Neighbours
from wanbatch.sim.quotas import Admission
from wanbatch.sim.state import SimState
from wanbatch.sim.tasks import TERMINAL, Endpoint, GenerationRequest, Task, TaskStatus

__all__ = ["Dropped", "Handler", "Service"]

Answer = tuple[int, dict[str, Any]]
#: (request, caller, request_id, may_fault): ``may_fault`` when the API stream drew no fault for the request
Handler = Callable[[web.Request, ApiKey, str, bool], Awaitable[Answer]]


class Dropped(Exception):
    """The connection is reset with no answer (the service has done, or will do, what was asked)."""


_LEGACY_SYNC_MODELS = ("wan2.2-t2i-flash", "wan2.2-t2i-plus")  # what the SDK's sync_call docstring names
_DAY_S = 86400.0


class Service:
    """The simulated DashScope task API over one :class:`SimState`."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.config = state.config
        self.neighbours = Neighbours(state)

    async def handle(
        self, request: web.Request, endpoint: str, run: Handler, *, sync: bool = False, read_kind: str = ""
    ) -> web.StreamResponse:
        """The common path of every API request."""
        started_s = time.monotonic()
        state = self.state
        state.requests[endpoint] += 1
        state.materialise()
        request_id = wire.new_request_id()
        aimed = not self.config.fault_endpoints or endpoint in self.config.fault_endpoints
        fault = state.faults.draw_api(sync=sync) if aimed else None
        if fault is Fault.RESET_BEFORE:
            state.faults_injected[fault] += 1
            state.statuses[(endpoint, 0)] += 1
            respond.reset(request)
            return web.Response()
        headers = respond.json_headers(request_id)
        try:
            caller = state.accounts.authenticate(request.headers.get("Authorization"))
            self._injected_errors(fault)
            if read_kind and not state.accounts.admit_read(caller, read_kind, state.clock.now()):
                raise state.accounts.throttled()
            status, body = await run(request, caller, request_id, aimed and fault is None)
        except Dropped:
            state.statuses[(endpoint, 0)] += 1
            respond.reset(request)
            return web.Response()
        except wire.SimError as error:
            status, body = error.status, bodies.error_body(request_id, error)
            if status == 429 and self.config.retry_after_s is not None:
                headers["Retry-After"] = f"{self.config.retry_after_s:g}"
        headers["req-cost-time"] = str(max(1, int((time.monotonic() - started_s) * 1000)))
        payload = json.dumps(body, ensure_ascii=False).encode()
        after = fault if fault is not None and fault not in BEFORE_FAULTS else None
        return await respond.send(request, state, endpoint, status, payload, headers, after)

    def _injected_errors(self, fault: Fault | None) -> None:
        """The before-kind faults that answer with an error (500, 503, a 429 storm)."""
        state = self.state
        if fault is Fault.INTERNAL_ERROR:
            state.faults_injected[fault] += 1
            raise wire.SimError(500, "InternalError", wire.INTERNAL_ERROR)
        if fault is Fault.MODEL_SERVING:
            state.faults_injected[fault] += 1
            raise wire.SimError(503, "ModelServingError", wire.MODEL_SERVING)
        now = state.clock.now()
        if fault is Fault.THROTTLE_STORM:
            state.faults.storm_until_s = now + self.config.storm_s
        if now < state.faults.storm_until_s:
            state.faults_injected[Fault.THROTTLE_STORM] += 1
            raise state.accounts.throttled()

    # --- create: the three generation endpoints

    def creator(self, endpoint: Endpoint) -> Handler:
        async def run(request: web.Request, caller: ApiKey, request_id: str, may_fault: bool) -> Answer:
            return await self._create(request, caller, request_id, endpoint, may_fault)

        return run

    async def _create(
        self, request: web.Request, caller: ApiKey, request_id: str, endpoint: Endpoint, may_fault: bool
    ) -> Answer:
        state, config = self.state, self.config
        endpoint, hold = self._mode(request, endpoint)
        body = validate.parse_json(await request.read())
        offer = validate.resolve_offer(body, config.region, endpoint)
        if hold and endpoint is Endpoint.LEGACY and offer.model.name not in _LEGACY_SYNC_MODELS:
            raise wire.SimError(403, "AccessDenied", wire.SYNC_NOT_SUPPORTED)
        refusal = caller.refused()
        if refusal is not None:
            raise refusal
        # Only async creates: a late or errored sync call would lose its images to every client.
        fault = state.faults.draw_create() if may_fault and not hold else None
        common = {
            "caller": caller,
            "offer": offer,
            "endpoint": endpoint,
            "fingerprint": validate.fingerprint(body),
            "request_id": request_id,
        }
        if fault is Fault.LATE_CREATE:
            self._land_later(body, common)
        admission = state.accounts.admit_submit(caller, offer, state.clock.now())
        if admission is not Admission.OK:
            raise state.accounts.throttled(admission)
        try:
            generation, echo = self._generation(body, offer)
        except wire.SimError as error:
            # A sync call has no task to report a failure in, so its parameter errors are always a 400.
            if not error.deferrable or config.param_errors == "submit" or hold:
                raise
            task = state.submit(**common, request=None, error=error, n=validate.requested_n(body, offer.model))
            return self._created(request_id, task, fault)
        task = state.submit(**common, request=generation, echo=echo)
        self.neighbours.beside(task, caller)
        if hold:
            legacy = endpoint is Endpoint.LEGACY
            return await self._finish_sync(request, task, request_id, legacy=legacy, may_fault=may_fault)
        return self._created(request_id, task, fault)

    def _generation(self, body: dict[str, Any], offer: catalog.Offer) -> tuple[GenerationRequest, str | None]:
        """The checked request, and the prompt its results echo when an echo variant falls on it (else None)."""
        model, state = offer.model, self.state
        variant = ""
        if model.protocol is catalog.Protocol.LEGACY and state.faults.hits(Fault.ECHO_VARIANT):
            # §2.1 gives wan2.2/2.1 both 500 and 800 characters: the other limit is as lawful as the catalog's.
            variants = ("collapsed", "limit", "both") if model.prompt_max == 500 else ("collapsed",)
            variant = state.faults.choice(Fault.ECHO_VARIANT, variants)
            state.faults_injected[Fault.ECHO_VARIANT] += 1
        other_limit = 500 if validate.prompt_limit(model, self.config) == 800 else 800
        prompt_max = other_limit if variant in ("limit", "both") else None
        generation = validate.parse_request(body, offer, self.config, state.seeds, prompt_max=prompt_max)
        refusal = validate.input_moderation(generation, self.config)
        if refusal is not None:
            raise refusal
        echo = " ".join(generation.prompt.split()) if variant in ("collapsed", "both") else None
        return generation, echo

    def _created(self, request_id: str, task: Task, fault: Fault | None) -> Answer:
        """The create's answer: the task id, or a 5xx although the task was made (error_after_create)."""
        if fault is Fault.ERROR_AFTER_CREATE:
            self.state.faults_injected[fault] += 1
            status, code, message = self.state.faults.choice(fault, wire.ERRORS_AFTER_CREATE)
            raise wire.SimError(status, code, message)
        return 200, _created(request_id, task)

    def _land_later(self, body: dict[str, Any], common: dict[str, Any]) -> None:
        """Reset the create now and make its task when it lands, up to ``late_create_max_s`` later (or never,
        when it would have been refused then: the quota is applied on landing)."""
        state = self.state
        state.faults_injected[Fault.LATE_CREATE] += 1
        sent_s = state.clock.now()
        try:
            generation, echo = self._generation(body, common["offer"])
        except wire.SimError:
            raise Dropped from None  # refused on landing: no task, and the client never hears of it

        def land(at_s: float) -> None:
            if state.accounts.admit_submit(common["caller"], common["offer"], at_s) is not Admission.OK:
                return
            task = state.submit(**common, request=generation, echo=echo, at_s=at_s, sent_s=sent_s)
            self.neighbours.beside(task, common["caller"])

        state.call_at(sent_s + state.faults.uniform(Fault.LATE_CREATE, 0.0, self.config.late_create_max_s), land)
        raise Dropped

    def _mode(self, request: web.Request, endpoint: Endpoint) -> tuple[Endpoint, bool]:
        """The endpoint served and whether the answer waits for the images, from ``X-DashScope-Async``."""
        wants_async = request.headers.get("X-DashScope-Async", "").strip().lower() == "enable"
        if endpoint is Endpoint.SYNC:
            if not wants_async:
                return endpoint, True
            if self.config.multimodal_async_header == "reject":
                raise wire.SimError(403, "AccessDenied", wire.ASYNC_NOT_SUPPORTED)
            return Endpoint.ASYNC, False
        if wants_async:
            return endpoint, False
        if self.config.legacy_sync and endpoint is Endpoint.LEGACY:
            return endpoint, True
        raise wire.SimError(403, "AccessDenied", wire.SYNC_NOT_SUPPORTED)

    async def _finish_sync(
        self, request: web.Request, task: Task, request_id: str, *, legacy: bool, may_fault: bool
    ) -> Answer:
        """Hold a sync call until its task ends in simulated time, then answer with its images (or lose them)."""
        state = self.state
        deadline_s = task.submit_s + self.config.sync_timeout_s
        while (status := state.status(task)) not in TERMINAL:
            if state.clock.now() >= deadline_s:
                # The task goes on (and is billed); only the answer is lost, as on the service.
                raise wire.SimError(500, "RequestTimeOut", wire.REQUEST_TIMEOUT)
            if not await state.sleep_until(min(task.end_s, deadline_s)):
                raise wire.SimError(503, "ModelUnavailable", "Model is unavailable, please try again later.")
        if may_fault and state.faults.hits(Fault.SYNC_LOST):
            state.faults_injected[Fault.SYNC_LOST] += 1
            state.materialise()  # billed before the answer is lost, as the service bills it
            if state.faults.choice(Fault.SYNC_LOST, (True, False)):
                raise Dropped
            raise wire.SimError(500, "RequestTimeOut", wire.REQUEST_TIMEOUT)
        urls = self.result_urls(request, task)
        if legacy:
            return 200, bodies.query_body(request_id, task.task_id, task, status, urls, self.config)
        if status is not TaskStatus.SUCCEEDED:
            code, message = task.failure
            raise wire.SimError(wire.STATUS_OF_CODE.get(code, 500), code, message)
        return 200, bodies.sync_body(request_id, task, urls, self.config)

    def result_urls(self, request: web.Request, task: Task) -> list[str | None]:
        origin = f"{request.scheme}://{request.host}"
        expires_s = int(task.url_expires_s)
        return [
            self.state.images.url(origin, task.object_keys[i], expires_s) if image.ok else None
            for i, image in enumerate(task.images)
        ]

    # --- tasks: query, cancel, list

    async def query(self, request: web.Request, caller: ApiKey, request_id: str, may_fault: bool) -> Answer:
        task_id = request.match_info["task_id"]
        task = self.state.find(task_id, caller)
        if task is not None and may_fault and self._read_as_unknown(task):
            task = None
        status = self.state.status(task) if task else TaskStatus.UNKNOWN
        urls = self.result_urls(request, task) if task and status is TaskStatus.SUCCEEDED else []
        return 200, bodies.query_body(request_id, task_id, task, status, urls, self.config)

    def _read_as_unknown(self, task: Task) -> bool:
        """query_unknown: a young task, read from a replica that has not seen it yet, once."""
        state = self.state
        if task.read_unknown or state.clock.now() - task.submit_s >= self.config.young_task_s:
            return False
        if not state.faults.hits(Fault.QUERY_UNKNOWN):
            return False
        state.faults_injected[Fault.QUERY_UNKNOWN] += 1
        task.read_unknown = True
        return True

    async def cancel(self, request: web.Request, caller: ApiKey, request_id: str, may_fault: bool) -> Answer:
        task = self.state.find(request.match_info["task_id"], caller)
        if task is None or not self.state.cancel(task):
            raise wire.SimError(400, "UnsupportedOperation", wire.CANCEL_NOT_PENDING)
        return 200, {"request_id": request_id}

    async def list(self, request: web.Request, caller: ApiKey, request_id: str, may_fault: bool) -> Answer:
        q = request.query
        page_no, page_size = _positive(q, "page_no", 1), _positive(q, "page_size", 10)
        lo_s, hi_s = self._window(q.get("start_time"), q.get("end_time"))
        model, status, key_id = q.get("model_name"), q.get("status"), q.get("api_key_id")
        region = catalog.REGIONS[self.config.region]
        if q.get("region") and q["region"] not in (region.name, region.region_id):
            return 200, bodies.list_body(request_id, [], 0, page_no, page_size)
        if q.get("task_id"):
            found = self.state.find(q["task_id"], caller)
            tasks = iter([found] if found and self.state.listed(found) else [])
        else:
            tasks = self.state.listing(caller, lo_s, hi_s)
        # Filter on the tasks themselves; only the page's entries are built.
        matching = [
            task
            for task in tasks
            if (not model or task.model == model)
            and (not key_id or task.key_id == key_id)
            and (not status or self.state.status(task) == status)
        ]
        page = matching[(page_no - 1) * page_size : page_no * page_size]
        entries = [bodies.list_entry(t, self.state.status(t), caller.account_uid, region.region_id) for t in page]
        return 200, bodies.list_body(request_id, entries, len(matching), page_no, page_size)

    def _window(self, start: str | None, end: str | None) -> tuple[float, float]:
        """The documented window: at most 24 h; one end given → 24 h from it; none → the last 24 h."""
        try:
            lo_s = wire.parse_list_time(start) if start else None
            hi_s = wire.parse_list_time(end) if end else None
        except ValueError as exc:
            raise wire.invalid_parameter(str(exc)) from None
        if lo_s is not None and hi_s is not None:
            if not 0 <= hi_s - lo_s <= _DAY_S:
                raise wire.invalid_parameter("end_time must be after start_time and within 24 hours of it")
            return lo_s, hi_s
        if lo_s is not None:
            return lo_s, lo_s + _DAY_S
        if hi_s is not None:
            return hi_s - _DAY_S, hi_s
        now = self.state.clock.now()
        return now - _DAY_S, now


def _created(request_id: str, task: Task) -> dict[str, Any]:
    return {"output": {"task_status": "PENDING", "task_id": task.task_id}, "request_id": request_id}


def _positive(query: Any, name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) < 1:
        raise wire.invalid_parameter(f"{name} must be a positive integer, got {text!r}")
    return int(text)
