"""One clock for the whole program, which can run faster than real time.

Everything that reads time (the simulator's task lifecycle, the engine's
poll intervals and rate limits, URL deadlines) asks a :class:`Clock`, never
``time.time()`` directly, so that tests can step time and the simulator can
run a minute of service time in a second of wall time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Clock", "ScaledClock"]


class Clock:
    """The interface: epoch seconds in the clock's time, and a sleep in it."""

    speed: float = 1.0

    def now(self) -> float:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def now_ms(self) -> int:
        return int(self.now() * 1000)


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

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)
