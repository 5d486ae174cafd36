"""One clock for the whole program, which can run faster than real time.

Everything that reads time (the simulator's task lifecycle, the engine's
poll intervals and rate limits, URL deadlines) asks a :class:`Clock`, never
``time.time()`` directly, so that tests can step time and the simulator can
run a minute of service time in a second of wall time.

Every wait the stages make in clock time goes through the clock too
(:meth:`Clock.sleep`, :meth:`Clock.wait_event`), so that no stage knows how
fast its clock runs: a :class:`ScaledClock` turns clock seconds into wall
seconds, a :class:`ManualClock` lets a test step time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable

from wanbatch import aio

__all__ = ["Clock", "ManualClock", "ScaledClock"]


class Clock:
    """The interface: epoch seconds in the clock's time, and waits in it."""

    def now(self) -> float:
        raise NotImplementedError

    def to_wall_s(self, seconds: float) -> float:
        """How many wall seconds ``seconds`` of clock time take (for limiters that run on the event loop's time)."""
        raise NotImplementedError

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` of clock time have passed."""
        await asyncio.sleep(self.to_wall_s(max(0.0, seconds)))

    async def wait_event(self, event: asyncio.Event, timeout_s: float, *, at_most_wall_s: float | None = None) -> bool:
        """Clear ``event`` and wait for it to be set again, up to ``timeout_s`` of clock time (and, if given, up to
        ``at_most_wall_s`` wall seconds: for what no event announces); True if it was set."""
        wall_s = self.to_wall_s(max(0.0, timeout_s))
        return await aio.wait_event(event, wall_s if at_most_wall_s is None else min(wall_s, at_most_wall_s))


class ScaledClock(Clock):
    """Epoch time that runs ``speed`` times faster than the wall clock.

    It starts at the real wall time (so timestamps look like real ones) and
    can be stepped forward with :meth:`advance` or rescaled with
    :meth:`set_speed` without ever going backwards.
    """

    def __init__(
        self,
        *,
        speed: float = 1.0,
        start_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"clock speed must be > 0, got {speed}")
        self._monotonic = monotonic
        self._origin_s = time.time() if start_s is None else start_s
        self._mono0 = monotonic()
        self.speed = speed

    def now(self) -> float:
        return self._origin_s + (self._monotonic() - self._mono0) * self.speed

    def advance(self, seconds: float) -> None:
        """Jump forward by ``seconds`` of clock time."""
        if seconds < 0:
            raise ValueError("a clock never goes backwards")
        self._origin_s += seconds

    def set_speed(self, speed: float) -> None:
        """Change the rate from now on; the current reading is kept."""
        if speed <= 0:
            raise ValueError(f"clock speed must be > 0, got {speed}")
        self._origin_s = self.now()
        self._mono0 = self._monotonic()
        self.speed = speed

    def anchor(self) -> tuple[float, float]:
        """(reading, wall epoch seconds) now: enough for another process to continue this clock."""
        return self.now(), time.time()

    def continue_from(self, reading_s: float, wall_s: float) -> None:
        """Run on from a reading another process took at wall time ``wall_s`` (see :meth:`anchor`).

        A run folder resumed against a sped-up service then keeps one timeline across its processes, so
        that what an earlier process recorded (when an attempt began) compares with what this one reads.
        """
        self._origin_s = reading_s + (time.time() - wall_s) * self.speed
        self._mono0 = self._monotonic()

    def to_wall_s(self, seconds: float) -> float:
        """How many wall seconds ``seconds`` of clock time take."""
        return seconds / self.speed


class ManualClock(Clock):
    """A clock that moves only when told to: :meth:`advance` or :meth:`set`. Sleepers and waiters on it return
    when its time reaches their deadline, whatever the wall clock does, so a test steps time instead of sleeping.
    """

    def __init__(self, *, start_s: float = 1_700_000_000.0) -> None:
        self._now_s = start_s
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()  # sleepers with one deadline wake in the order they slept

    def now(self) -> float:
        return self._now_s

    def to_wall_s(self, seconds: float) -> float:
        """No wall time belongs to a manual clock's: what runs on the wall (a rate limiter) is not held back."""
        return 0.0

    def set(self, now_s: float) -> None:
        """Move to ``now_s`` (never back), waking every sleeper whose deadline it reaches."""
        if now_s < self._now_s:
            raise ValueError("a clock never goes backwards")
        self._now_s = now_s
        while self._sleepers and self._sleepers[0][0] <= now_s:
            _, _, woken = heapq.heappop(self._sleepers)
            if not woken.done():
                woken.set_result(None)

    def advance(self, seconds: float) -> None:
        """Jump forward by ``seconds`` of clock time."""
        if seconds < 0:
            raise ValueError("a clock never goes backwards")
        self.set(self._now_s + seconds)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # a zero sleep still lets others run, as asyncio's does
            return
        woken = self._alarm(seconds)
        try:
            await woken
        finally:
            woken.cancel()  # a canceled sleeper's entry is passed over when its deadline comes

    async def wait_event(self, event: asyncio.Event, timeout_s: float, *, at_most_wall_s: float | None = None) -> bool:
        event.clear()
        waiting = asyncio.ensure_future(event.wait())
        woken = self._alarm(max(timeout_s, 0.0))  # set now: a step of the clock right after this call counts
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(at_most_wall_s):
                    await asyncio.wait((waiting, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            woken.cancel()
        return event.is_set()

    def _alarm(self, seconds: float) -> asyncio.Future[None]:
        """A future done once the clock has moved ``seconds`` on from now."""
        woken = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            woken.set_result(None)
        elif seconds != math.inf:  # a wait with no end in clock time keeps no alarm that could never ring
            heapq.heappush(self._sleepers, (self._now_s + seconds, next(self._order), woken))
        return woken
