"""The service's JSON shapes: request bodies out, its answers in as typed views.

Every answer the stages act on is read here, once: a task query (or a sync
answer) becomes a :class:`TaskView` whose times are already on our clock, a
page of the task list a :class:`ListPage`. Nothing past this module digs in
the service's dicts or compares bare status strings. An answer that cannot be
read raises :class:`MalformedAnswer`: it is asked for again, never acted on.

Two protocols carry the same request (spec §2): the legacy one puts the
prompt in ``input.prompt`` and the negative prompt in ``input``; wan2.6's puts
the prompt in a single user message and the negative prompt in
``parameters``. Results come back as ``results[]`` (legacy) or
``choices[].message.content[]`` (wan2.6), and a failed image is an element
with ``code``/``message`` instead of a URL.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wanbatch.catalog import Protocol
from wanbatch.errors import MalformedAnswer

__all__ = [
    "Anchor",
    "ImageResult",
    "ListPage",
    "ListRow",
    "MalformedAnswer",
    "TaskStatus",
    "TaskView",
    "build_body",
    "image_results",
    "list_page",
    "parse_service_time_s",
    "place_s",
    "result_prompts",
    "task_view",
    "url_expires_s",
]


#: The service writes task times as local time in UTC+8 (spec §3).
SERVICE_TZ = timezone(timedelta(hours=8))
#: Later than any real URL's Expires (the year 5138); NaN and infinities fail the comparison too.
MAX_EXPIRES_S = 1e11
_SERVICE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{1,6}")
MAX_RUNNING_S = 24 * 3600.0  #: no task runs longer than the service keeps it
MAX_EPOCH_MS = 2**62  #: past any real time, and past what the ledger's integers hold


class TaskStatus(enum.StrEnum):
    """A task's status as the service reports it (spec §3)."""

    #: Queued on the service behind the account's running tasks.
    PENDING = "PENDING"
    #: Generating.
    RUNNING = "RUNNING"
    #: Ended with results (some images may have failed): billed per image that came out.
    SUCCEEDED = "SUCCEEDED"
    #: Ended without results: not billed.
    FAILED = "FAILED"
    #: Canceled before it started: not billed.
    CANCELED = "CANCELED"
    #: The service does not know the task: forgotten past its lifetime, or a passing fault for a young one.
    UNKNOWN = "UNKNOWN"

    @classmethod
    def read(cls, value: object) -> TaskStatus | None:
        """The status named by ``value``; None for anything else (SUSPENDED, say, which the SDK knows)."""
        if value == "CANCELLED":  # the SDK's spelling: a task in it is no less canceled
            return cls.CANCELED
        try:
            return cls(value)
        except ValueError:
            return None

    @property
    def is_open(self) -> bool:
        """Still on the service's queue or running: its end is yet to come."""
        return self in (TaskStatus.PENDING, TaskStatus.RUNNING)

    @property
    def unbilled(self) -> bool:
        """Ended without costing anything."""
        return self in (TaskStatus.FAILED, TaskStatus.CANCELED)


@dataclass(frozen=True, slots=True)
class Anchor:
    """One moment both clocks know: ``ours_s`` on our clock is ``service_s`` on the service's."""

    ours_s: float
    service_s: float


def place_s(service_s: float | None, anchor: Anchor | None) -> float | None:
    """A time on the service's clock placed on ours through ``anchor``; None when either is unknown.

    The only place a service time crosses to our clock: the clocks may disagree by any amount (a skewed
    machine, a sped-up simulator), but they run at the same rate, so one shared moment is enough.
    """
    if service_s is None or anchor is None:
        return None
    placed = anchor.ours_s + (service_s - anchor.service_s)
    return placed if math.isfinite(placed) else None


def build_body(request: Mapping[str, Any], *, api_name: str, protocol: Protocol) -> dict[str, Any]:
    """The wire body for a canonical request (the manifest's ``Item.request()``)."""
    parameters: dict[str, Any] = {
        "size": request["size"],
        "n": request["n"],
        "prompt_extend": request["prompt_extend"],
        "watermark": request["watermark"],
    }
    if request.get("seed") is not None:
        parameters["seed"] = request["seed"]
    negative = request.get("negative_prompt")
    if protocol is Protocol.LEGACY:
        body_input: dict[str, Any] = {"prompt": request["prompt"]}
        if negative:
            body_input["negative_prompt"] = negative
    else:
        body_input = {"messages": [{"role": "user", "content": [{"text": request["prompt"]}]}]}
        if negative:
            parameters["negative_prompt"] = negative
    return {"model": api_name, "input": body_input, "parameters": parameters}


@dataclass(frozen=True, slots=True)
class ImageResult:
    index: int
    url: str | None  #: None when this image failed
    code: str = ""
    message: str = ""
    actual_prompt: str | None = None
    expires_s: float | None = None  #: the URL's Expires, when it has one (on the clock of the caller's anchor)


def image_results(output: Mapping[str, Any], anchor: Anchor | None = None) -> list[ImageResult]:
    """Every image of a finished task's ``output``, in order, succeeded or not; each URL's Expires placed on our
    clock through ``anchor`` (without one, the clocks are taken to agree).

    Raises :class:`MalformedAnswer` when the results are not a list of objects each holding a URL or an
    error code: a paid image is never written off because one answer came back garbled.
    """
    if "results" in output:
        elements = output.get("results")
    else:
        choices = output.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise MalformedAnswer(f"choices is not a list of objects: {choices!r:.120}")
        elements = []
        for choice in choices:
            content = (choice.get("message") or {}).get("content") if isinstance(choice.get("message"), dict) else None
            if not isinstance(content, list):
                raise MalformedAnswer(f"a choice has no content list: {choice!r:.120}")
            elements += content
    if not isinstance(elements, list) or not elements:
        raise MalformedAnswer(f"no results to read: {elements!r:.120}")
    found = []
    for index, element in enumerate(elements):
        if not isinstance(element, dict):
            raise MalformedAnswer(f"result {index} is not an object: {element!r:.120}")
        url = element.get("url", element.get("image"))
        code = element.get("code")
        if not (isinstance(url, str) and url) and not (isinstance(code, str) and code):
            raise MalformedAnswer(f"result {index} has neither a URL nor an error code: {element!r:.120}")
        actual = element.get("actual_prompt")
        expires_s = url_expires_s(url) if isinstance(url, str) and url else None
        found.append(
            ImageResult(
                index=index,
                url=url if isinstance(url, str) and url else None,
                code=str(code or ""),
                message=str(element.get("message") or ""),
                actual_prompt=actual if isinstance(actual, str) else None,
                expires_s=expires_s if anchor is None else place_s(expires_s, anchor),
            )
        )
    return found


def parse_service_time_s(text: object) -> float | None:
    """``"2025-01-08 16:03:59.840"`` (UTC+8) → epoch seconds; None if absent or unreadable."""
    # Checked by shape, then read by fromisoformat: strptime costs several times more, on every task.
    if not isinstance(text, str) or not _SERVICE_TIME.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=SERVICE_TZ).timestamp()
    except ValueError:
        return None


def url_expires_s(url: str) -> float | None:
    """The ``Expires`` of a signed result URL, in epoch seconds; None when it has none.

    Raises :class:`MalformedAnswer` for one that is not a number, not finite or past any real date: the
    answer is garbled (and such a value could overflow the ledger's integers), so it is asked for again.
    """
    try:
        values = parse_qs(urlsplit(url).query).get("Expires")
    except ValueError:  # not a URL at all (an unclosed [host], say)
        raise MalformedAnswer(f"result URL {url!r:.120} cannot be read") from None
    if not values:
        return None
    try:
        value = float(values[0])
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_EXPIRES_S:
        raise MalformedAnswer(f"a result URL's Expires is not a time: {values[0]!r:.40}")
    return value


def result_prompts(output: Mapping[str, Any]) -> set[str]:
    """The ``orig_prompt`` of each legacy result that has one as text: what a task was asked, for matching it
    to a request. Anything else in ``results`` is left out, never raised on."""
    results = output.get("results")
    if not isinstance(results, list):
        return set()
    prompts = [e.get("orig_prompt") for e in results if isinstance(e, dict)]
    return {p for p in prompts if isinstance(p, str) and p}  # an empty echo tells nothing


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskView:
    """What one answer says of one task, its times on our clock (None where the answer does not say)."""

    status: TaskStatus
    request_id: str = ""
    code: str = ""  #: why a FAILED task failed
    message: str = ""
    started_s: float | None = None  #: when it started running
    ended_s: float | None = None
    #: a SUCCEEDED task's images, in order (empty for any other status)
    results: tuple[ImageResult, ...] = ()
    prompts: frozenset[str] = frozenset()  #: the prompts its results echo (legacy), to match it to a request
    images_asked: int | None = None  #: how many images it was asked for (``task_metrics.TOTAL``)
    size: str | None = None  #: its images' size as a request writes it ("1024*1024"), from ``usage``

    @property
    def running_s(self) -> float | None:
        """How long it ran, when both ends are known and make sense."""
        if self.started_s is None or self.ended_s is None or self.ended_s < self.started_s:
            return None
        return self.ended_s - self.started_s


def task_view(data: object, *, sent_s: float | None, now_s: float, sync: bool = False) -> TaskView:
    """Read a task query's answer (or, ``sync``, a sync call's, which holds a finished task without a status).

    ``sent_s``: when our attempt began (our clock), the moment the service's ``submit_time`` is anchored to.
    Without it (or without a ``submit_time``), the task's end is taken as ``now_s``: an answer cannot be older
    than now. Raises :class:`MalformedAnswer` when the status, or a SUCCEEDED task's results, cannot be read.
    """
    body = data if isinstance(data, dict) else {}
    output = body.get("output")
    if not isinstance(output, dict):
        raise MalformedAnswer(f"the answer has no output object: {data!r:.120}")
    status = TaskStatus.SUCCEEDED if sync else TaskStatus.read(output.get("task_status"))
    if status is None:
        raise MalformedAnswer(f"task_status is not a status: {output.get('task_status')!r:.40}")
    submitted = parse_service_time_s(output.get("submit_time"))
    ended = parse_service_time_s(output.get("end_time"))
    anchor = None
    if submitted is not None and sent_s is not None:
        anchor = Anchor(sent_s, submitted)
    elif ended is not None:
        anchor = Anchor(now_s, ended)
    results: tuple[ImageResult, ...] = ()
    if status is TaskStatus.SUCCEEDED:
        results = tuple(image_results(output, anchor))  # raises MalformedAnswer: never act on garbled results
    metrics, usage = output.get("task_metrics"), body.get("usage")
    asked = metrics.get("TOTAL") if isinstance(metrics, dict) else None
    size = usage.get("size") if isinstance(usage, dict) else None
    return TaskView(
        status=status,
        request_id=str(body.get("request_id") or ""),
        code=str(output.get("code") or ""),
        message=str(output.get("message") or ""),
        started_s=place_s(parse_service_time_s(output.get("scheduled_time")), anchor),
        ended_s=place_s(ended, anchor),
        results=results,
        prompts=frozenset(result_prompts(output)),
        images_asked=asked if isinstance(asked, int) and not isinstance(asked, bool) else None,
        size=size.replace("x", "*") if isinstance(size, str) else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRow:
    """One task of a list page. Its times are the service's (epoch seconds on its clock): a row is placed on
    ours through the task's creation, by whoever knows when its create was sent."""

    task_id: str
    status: TaskStatus | None  #: None: a status we do not know (SUSPENDED), which may pass
    created_ms: int | None = None  #: ``gmt_create``, epoch ms on the service's clock
    api_key_id: str | None = None
    started_s: float | None = None
    ended_s: float | None = None

    def on_our_clock(self, service_s: float | None, *, sent_s: float) -> float | None:
        """One of the row's times placed on our clock, its creation taken as the moment our create was sent (at
        ``sent_s``); None when unknown or out of a task's life (a garbled time)."""
        anchor = None if self.created_ms is None else Anchor(sent_s, self.created_ms / 1000)
        placed = place_s(service_s, anchor)
        return placed if placed is not None and 0.0 <= placed - sent_s <= MAX_RUNNING_S else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListPage:
    rows: tuple[ListRow, ...] = ()  #: the readable rows (a task id and a status), in the page's order
    raw_rows: int = 0  #: how many rows the page had, readable or not
    total_pages: int | None = None  #: None when unreadable
    by_id: dict[str, ListRow] = field(default_factory=dict, compare=False)

    @property
    def whole(self) -> bool:
        """Every row of the page was read, and its page count: only a whole page proves a task absent."""
        return len(self.rows) == self.raw_rows and self.total_pages is not None


def list_page(data: object) -> ListPage:
    """Read one page of the task list. A row without a task id and a status is left out (the page is then not
    whole); never raises: what can be read of a list is worth having."""
    body = data if isinstance(data, dict) else {}
    raw = body.get("data")
    raw = raw if isinstance(raw, list) else []
    rows = [row for row in map(_list_row, raw) if row is not None]
    pages = body.get("total_page")
    valid = _is_int(pages) and pages >= 0
    return ListPage(
        rows=tuple(rows),
        raw_rows=len(raw),
        total_pages=pages if valid else None,
        by_id={row.task_id: row for row in rows},
    )


def _list_row(entry: object) -> ListRow | None:
    if not isinstance(entry, dict):
        return None
    task_id, status = entry.get("task_id"), entry.get("status")
    if not (isinstance(task_id, str) and task_id and isinstance(status, str)):
        return None
    created = entry.get("gmt_create")
    key_id = entry.get("api_key_id")
    return ListRow(
        task_id=task_id,
        status=TaskStatus.read(status),
        created_ms=created if _is_int(created) and abs(created) < MAX_EPOCH_MS else None,
        api_key_id=key_id if isinstance(key_id, str) else None,
        started_s=_epoch_ms_s(entry.get("start_time")),
        ended_s=_epoch_ms_s(entry.get("end_time")),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _epoch_ms_s(value: object) -> float | None:
    """A list time (epoch milliseconds) in seconds; None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value) / 1000
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None
