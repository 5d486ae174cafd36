"""Faults the simulator injects, by named profile and per-fault rate.

Each API request (create, sync, query, list, cancel) draws at most one fault,
each image download at most one download fault, each new task whether its URLs
expire early. The draws come from random generators seeded by the config's
``seed``, one per stream, so the same requests in the same order meet the
same faults. Rates are probabilities of disjoint outcomes: within a stream
they should sum to at most 1.

*Before* faults answer without touching anything (no task is created).
*After* faults act once the request has been handled: a create has made its
task, which runs and is billed, a cancel has canceled. The sync endpoint gets
only *before* faults from that stream; its lost answer (``sync_lost``) is a
fault of its own, kept out of ``chaos`` since no client could recover it.

The *service* faults (what the service, its gateway and its object storage
may lawfully do beyond plain errors: a create answered 5xx after its task was
made, a create that lands late, a lagging list, a young task read as UNKNOWN,
transient object-storage errors, a lost sync answer, a prompt echoed in
another form) each draw from a stream of their own, only while their rate is
above zero, so switching one on changes no other fault's sequence. A request
meets a service fault only when the API stream left it alone.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TypeVar

__all__ = [
    "AFTER_FAULTS",
    "BEFORE_FAULTS",
    "CREATE_FAULTS",
    "DOWNLOAD_FAULTS",
    "FAULT_PROFILES",
    "IMAGE_FAULTS",
    "PROFILE_NEIGHBOURS",
    "SERVICE_FAULTS",
    "Fault",
    "FaultInjector",
]

T = TypeVar("T")


class Fault(enum.StrEnum):
    """One kind of misbehaviour. The docs of each member say what a client sees."""

    #: 500 InternalError, before the request is handled
    INTERNAL_ERROR = "internal_error"
    #: 503 ModelServingError, before the request is handled
    MODEL_SERVING = "model_serving"
    #: starts a storm: every API request gets 429 Throttling.RateQuota for ``storm_s``
    THROTTLE_STORM = "throttle_storm"
    #: the connection is reset before the request is handled
    RESET_BEFORE = "reset_before"
    #: the connection is reset after the request was handled (a created task exists and will be billed)
    RESET_AFTER = "reset_after"
    #: the answer is held ``hold_s`` after the request was handled (clients time out)
    HOLD_RESPONSE = "hold_response"
    #: the answer's body trickles out over ``slow_body_s``
    SLOW_BODY = "slow_body"
    #: the answer's body stops half-way (Content-Length promises more) and the connection closes
    TRUNCATED_BODY = "truncated_body"
    #: a complete HTTP answer whose JSON body is cut short
    MALFORMED_JSON = "malformed_json"
    #: an image download trickles out over ``slow_body_s``
    SLOW_DOWNLOAD = "slow_download"
    #: an image download stops half-way and the connection closes
    TRUNCATED_DOWNLOAD = "truncated_download"
    #: a task's URLs expire ``early_expiry_s`` after it ends instead of ``url_ttl_s``
    EARLY_EXPIRY = "early_expiry"
    #: an async create makes its task (it runs and is billed), then is answered 500 or 503
    ERROR_AFTER_CREATE = "error_after_create"
    #: an async or sync create is reset unanswered; its task is made up to ``late_create_max_s`` later
    LATE_CREATE = "late_create"
    #: a new task stays out of ``GET /tasks`` for ``list_lag_s`` (``GET /tasks/{id}`` finds it)
    LIST_LAG = "list_lag"
    #: a query of a task younger than ``young_task_s`` answers UNKNOWN once; the next query answers truly
    QUERY_UNKNOWN = "query_unknown"
    #: the first GET of an image answers 503 SlowDown (object storage); later GETs work
    IMAGE_SLOWDOWN = "image_slowdown"
    #: the first GET of an image answers 404 NoSuchKey; later GETs work
    IMAGE_NOT_FOUND = "image_not_found"
    #: the first GET of an image answers 403 AccessDenied; later GETs work
    IMAGE_DENIED = "image_denied"
    #: a sync call's task runs and is billed, then the answer is lost (a reset or 500 RequestTimeOut)
    SYNC_LOST = "sync_lost"
    #: a task's ``orig_prompt`` echoes the prompt with whitespace collapsed and/or truncated at another limit
    ECHO_VARIANT = "echo_variant"


BEFORE_FAULTS = (Fault.INTERNAL_ERROR, Fault.MODEL_SERVING, Fault.THROTTLE_STORM, Fault.RESET_BEFORE)
AFTER_FAULTS = (Fault.RESET_AFTER, Fault.HOLD_RESPONSE, Fault.SLOW_BODY, Fault.TRUNCATED_BODY, Fault.MALFORMED_JSON)
DOWNLOAD_FAULTS = (Fault.SLOW_DOWNLOAD, Fault.TRUNCATED_DOWNLOAD)
CREATE_FAULTS = (Fault.LATE_CREATE, Fault.ERROR_AFTER_CREATE)
IMAGE_FAULTS = (Fault.IMAGE_SLOWDOWN, Fault.IMAGE_NOT_FOUND, Fault.IMAGE_DENIED)
#: Drawn each on a stream of its own, by the service, the gateway or the object store (see the module's docs).
SERVICE_FAULTS = (
    *CREATE_FAULTS,
    Fault.LIST_LAG,
    Fault.QUERY_UNKNOWN,
    *IMAGE_FAULTS,
    Fault.SYNC_LOST,
    Fault.ECHO_VARIANT,
)

_UNKIND = {
    Fault.ERROR_AFTER_CREATE: 0.05,
    Fault.LATE_CREATE: 0.05,
    Fault.LIST_LAG: 0.2,
    Fault.QUERY_UNKNOWN: 0.1,
    Fault.IMAGE_SLOWDOWN: 0.03,
    Fault.IMAGE_NOT_FOUND: 0.02,
    Fault.IMAGE_DENIED: 0.02,
    Fault.SYNC_LOST: 0.05,
    Fault.ECHO_VARIANT: 0.3,
}

_CHAOS = {
    Fault.INTERNAL_ERROR: 0.02,
    Fault.MODEL_SERVING: 0.02,
    Fault.THROTTLE_STORM: 0.005,
    Fault.RESET_BEFORE: 0.02,
    Fault.RESET_AFTER: 0.02,
    Fault.HOLD_RESPONSE: 0.01,
    Fault.SLOW_BODY: 0.01,
    Fault.TRUNCATED_BODY: 0.02,
    Fault.MALFORMED_JSON: 0.02,
    Fault.SLOW_DOWNLOAD: 0.02,
    Fault.TRUNCATED_DOWNLOAD: 0.03,
    Fault.ERROR_AFTER_CREATE: 0.02,
    Fault.LATE_CREATE: 0.02,
    Fault.LIST_LAG: 0.1,
    Fault.QUERY_UNKNOWN: 0.05,
    Fault.IMAGE_SLOWDOWN: 0.02,
    Fault.IMAGE_NOT_FOUND: 0.01,
    Fault.IMAGE_DENIED: 0.01,
    Fault.ECHO_VARIANT: 0.1,
}

#: Named sets of fault rates. ``chaos`` holds every fault a correct client loses nothing by; early URL
#: expiry, which loses images a slow client has not saved, has a profile of its own, and the lost sync
#: answer (which no client can recover) is only in ``unkind``.
FAULT_PROFILES: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "none": MappingProxyType({}),
        "chaos": MappingProxyType(dict(_CHAOS)),
        "errors": MappingProxyType({Fault.INTERNAL_ERROR: 0.1, Fault.MODEL_SERVING: 0.1}),
        "network": MappingProxyType(
            {
                Fault.RESET_BEFORE: 0.05,
                Fault.RESET_AFTER: 0.05,
                Fault.TRUNCATED_BODY: 0.05,
                Fault.MALFORMED_JSON: 0.05,
                Fault.TRUNCATED_DOWNLOAD: 0.1,
            }
        ),
        "expire-early": MappingProxyType({Fault.EARLY_EXPIRY: 0.5}),
        "unkind": MappingProxyType(dict(_UNKIND)),
    }
)

#: (neighbour_rate, neighbour_background_rps) of a profile, for the config fields left at None; (0, 0) if absent.
PROFILE_NEIGHBOURS: Mapping[str, tuple[float, float]] = MappingProxyType({"chaos": (0.1, 0.01), "unkind": (0.3, 0.05)})


class FaultInjector:
    """Draws faults for requests from the active profile and per-fault rates."""

    def __init__(self, *, profile: str, rates: Mapping[str, float], seed: int) -> None:
        self._api = random.Random(f"{seed}/faults/api")
        self._download = random.Random(f"{seed}/faults/download")
        self._expiry = random.Random(f"{seed}/faults/expiry")
        self._own = {fault: random.Random(f"{seed}/faults/{fault}") for fault in SERVICE_FAULTS}
        self.storm_until_s = float("-inf")
        self.profile = "none"
        self._rates: dict[Fault, float] = {}
        self.set(profile, reset=True, **rates)

    def set(self, profile: str | None, *, reset: bool = False, **rates: float) -> None:
        """Switch to ``profile`` (dropping earlier per-fault rates), or keep it; then apply ``rates`` on top."""
        if profile is not None:
            if profile not in FAULT_PROFILES:
                raise ValueError(f"unknown fault profile {profile!r}; known: {', '.join(FAULT_PROFILES)}")
            self.profile, reset = profile, True
        if reset:
            self._rates = {Fault(name): rate for name, rate in FAULT_PROFILES[self.profile].items()}
        for name, rate in rates.items():
            if name not in Fault.__members__.values():
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(Fault)}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate for {name} must be in [0, 1], got {rate}")
            self._rates[Fault(name)] = rate

    @property
    def rates(self) -> Mapping[str, float]:
        return MappingProxyType({str(f): r for f, r in self._rates.items() if r})

    def draw_api(self, *, sync: bool) -> Fault | None:
        """The fault for one API request (before or after kinds; only before kinds for the sync endpoint)."""
        kinds = BEFORE_FAULTS if sync else BEFORE_FAULTS + AFTER_FAULTS
        return self._draw(self._api, kinds)

    def draw_download(self) -> Fault | None:
        return self._draw(self._download, DOWNLOAD_FAULTS)

    def expires_early(self) -> bool:
        rate = self._rates.get(Fault.EARLY_EXPIRY, 0.0)
        return bool(rate) and self._expiry.random() < rate

    def any_on(self, kinds: Sequence[Fault]) -> bool:
        """Whether any of ``kinds`` has a rate above zero."""
        return any(self._rates.get(kind) for kind in kinds)

    def hits(self, fault: Fault) -> bool:
        """Whether a service fault falls on this request or task, drawn on the fault's own stream."""
        rate = self._rates.get(fault, 0.0)
        return bool(rate) and self._own[fault].random() < rate

    def draw_create(self) -> Fault | None:
        """The create fault of one async create that met no API fault: a late landing or an error after creating."""
        return next((fault for fault in CREATE_FAULTS if self.hits(fault)), None)

    def draw_image(self) -> Fault | None:
        """The object-storage error of an image's first GET, if any."""
        return next((fault for fault in IMAGE_FAULTS if self.hits(fault)), None)

    def choice(self, fault: Fault, options: Sequence[T]) -> T:
        """One of ``options``, drawn on ``fault``'s own stream (which error, which variant)."""
        return self._own[fault].choice(options)

    def uniform(self, fault: Fault, low: float, high: float) -> float:
        return self._own[fault].uniform(low, high)

    def _draw(self, rng: random.Random, kinds: tuple[Fault, ...]) -> Fault | None:
        if not any(self._rates.get(kind) for kind in kinds):
            return None  # no draw at all, so switching faults on later starts a fresh, reproducible sequence
        u, edge = rng.random(), 0.0
        for kind in kinds:
            edge += self._rates.get(kind, 0.0)
            if u < edge:
                return kind
        return None
