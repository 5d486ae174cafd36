"""How fast to send: evenly spaced requests within a quota, slowed on 429 and recovered (AIMD).

aiolimiter's bucket starts full, which would open every lane with a burst of
``rate`` requests, exactly what the service answers with
``Throttling.BurstRate``. A bucket of capacity one spaces requests evenly
instead: in any one-second window at most ``floor(rate) + 1`` can fall, so the
rate is taken with a margin below the quota.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

from wanbatch.clock import Clock

__all__ = ["GUARD_INTERVALS", "Pacer", "even_limiter"]

#: The guard is at most this many of the quota's own intervals. It stands for a few milliseconds of arrival
#: jitter, which matters while the service's window holds few requests (every catalog quota, up to speed
#: 100); against a quota far above what one process can send, a fixed guard would be the only limit left.
GUARD_INTERVALS = 10


def even_limiter(rate_per_s: float, *, clock: Clock) -> AsyncLimiter:
    """A limiter that lets one acquisition through every ``1/rate`` seconds of ``clock``, with no burst."""
    return AsyncLimiter(1, clock.to_wall_s(1.0 / rate_per_s))


class Pacer:
    """One lane's submit pacing: multiplicative decrease on throttling, additive increase on success."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        clock: Clock,
        margin: float = 0.9,
        floor: float = 0.1,
        step: float = 0.05,
        guard_s: float = 0.01,
    ) -> None:
        """``guard_s`` is wall time added to every interval: requests sent evenly can still arrive a few
        milliseconds closer together, which on a fast simulated clock is a large part of a second. It is
        capped at ``GUARD_INTERVALS`` intervals, so an unlimited quota is not held to 1/guard_s creates/s."""
        self.quota_per_s = rate_per_s
        self._clock, self._margin, self._floor, self._step = clock, margin, floor, step
        self.factor = 1.0
        interval_s = clock.to_wall_s(1.0 / (rate_per_s * margin))
        self.interval_s = interval_s + min(guard_s, GUARD_INTERVALS * interval_s)  #: wall time between creates
        self._limiter = AsyncLimiter(1, self.interval_s)
        # Retrying submits wait here too: one at a time, so the slowed spacing holds between all of them.
        self._turn = asyncio.Lock()
        self._next_wall_s = 0.0  #: the event loop's time at which the next request may go at the earliest

    @property
    def rate_per_s(self) -> float:
        return self.quota_per_s * self._margin * self.factor

    async def wait(self) -> None:
        """Return when the next request may go."""
        async with self._turn:
            await self._limiter.acquire()
            extra_s = 0.0
            if self.factor < 1.0:
                # Slowed down: stretch the spacing beyond the limiter's full-quota interval.
                extra_s = 1.0 / self.rate_per_s - 1.0 / (self.quota_per_s * self._margin)
            self._next_wall_s = asyncio.get_running_loop().time() + self.interval_s + self._clock.to_wall_s(extra_s)
            if extra_s:
                await self._clock.sleep(extra_s)

    def ready_in_wall_s(self) -> float:
        """About how long (wall seconds) until :meth:`wait` would let a request go: where lanes of several
        accounts could take an item, it goes to the one whose pace frees soonest."""
        return max(0.0, self._next_wall_s - asyncio.get_running_loop().time())

    def throttled(self) -> None:
        """A 429 came back: halve the rate (down to the floor)."""
        self.factor = max(self._floor, self.factor / 2)

    def succeeded(self) -> None:
        self.factor = min(1.0, self.factor + self._step)
