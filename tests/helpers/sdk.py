"""Running the simulator for the official, synchronous dashscope SDK.

The SDK's 1.x API blocks on ``requests`` and its ``wait()`` sleeps real
seconds, so the simulator cannot share the caller's thread: it is served
from its own event loop in a background thread, and every touch of its
state (clock, billing log, tasks) is marshalled onto that loop, which
owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dashscope
import requests
from PIL import Image

from wanbatch.sim import SimConfig, running_sim

__all__ = [
    "FAST",
    "FROZEN",
    "KEYS",
    "PNG_SIGNATURE",
    "SimThread",
    "fetch_png",
    "generation_image_urls",
    "sdk_base_url",
]

T = TypeVar("T")

#: A simulated minute in a tenth of a wall second: a task ends between two of ``wait()``'s polls.
FAST = 600.0
#: Time stands still unless a test advances it (a day of wall time is under a tenth of a simulated second).
FROZEN = 1e-6

KEYS = {"beijing": "sk-sim-beijing", "singapore": "sk-sim-singapore", "virginia": "sk-sim-virginia"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_START_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 10.0


class SimThread:
    """One simulator on a free loopback port, served from a thread of its own."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="wanbatch-sim", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.sim: Any = None

    def __enter__(self) -> SimThread:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the simulator did not start in time")
        if self._error is not None:
            raise RuntimeError("the simulator failed to start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may already be gone
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_START_TIMEOUT_S)

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the starting thread, which raises it
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_sim(self._config) as sim:
            self.sim = sim
            self._ready.set()
            await self._stop.wait()

    # The simulator's state lives on its loop; these run there and hand back the answer.

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` run on the simulator's loop, its result returned here."""
        assert self._loop is not None

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(_CALL_TIMEOUT_S)

    @property
    def base_url(self) -> str:
        return self.sim.base_url

    def advance(self, seconds: float) -> None:
        """Step the simulator's clock forward."""
        self.call(self.sim.advance, seconds)

    def set_speed(self, speed: float) -> None:
        self.call(self.sim.set_speed, speed)

    def set_faults(self, profile: str | None = None, **rates: float) -> None:
        """Switch the simulator's fault profile and per-fault rates."""
        self.call(lambda: self.sim.set_faults(profile, **rates))

    def now_s(self) -> float:
        """The simulator's clock, epoch seconds."""
        return self.call(self.sim.clock.now)

    def billing(self) -> list[dict]:
        """A copy of the billing log, one record per billed image."""
        return self.call(lambda: [dict(r) for r in self.sim.billing])

    def requests(self) -> Counter:
        """A copy of the request counts by endpoint."""
        return self.call(lambda: Counter(self.sim.requests))

    def task_ids(self) -> set[str]:
        """Every task the simulator holds."""
        return self.call(lambda: set(self.sim.tasks))


@contextlib.contextmanager
def sdk_base_url(url: str) -> Iterator[None]:
    """Point the SDK's 1.x API at ``url`` for the block, then put the old address back."""
    saved = dashscope.base_http_api_url
    dashscope.base_http_api_url = url
    try:
        yield
    finally:
        dashscope.base_http_api_url = saved


def fetch_png(url: str) -> tuple[bytes, tuple[int, int]]:
    """Download ``url`` and return its bytes and pixel size, failing unless it is a PNG."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, f"GET {url} -> {response.status_code}: {response.text[:200]}"
    body = response.content
    assert body.startswith(PNG_SIGNATURE), f"not a PNG: {body[:16]!r}"
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: a truncated body fails here
        return body, image.size


def generation_image_urls(output: Any) -> list[str]:
    """The image URLs of a wan2.6 ``choices`` output, across all choices and content items."""
    urls = []
    for choice in output.get("choices") or []:
        message = choice.get("message") or {}
        for part in message.get("content") or []:
            if part.get("image"):
                urls.append(part["image"])
    return urls
