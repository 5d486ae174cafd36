"""Small asyncio helpers the stages share."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

__all__ = ["KeyedLock", "stop_on_signals", "wait_event"]


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Clear ``event`` and wait up to ``timeout_s`` wall seconds for it to be set again; True if it was.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can swallow a cancellation
    that arrives as its timeout fires, and a stage that misses its cancellation keeps a stopped run alive.
    """
    event.clear()
    try:
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await event.wait()
    except TimeoutError:
        return False
    return True


def stop_on_signals() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM (where it can watch signals): a server's stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    return stop


class KeyedLock:
    """One lock per key, made when first wanted and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (its lock, holders and waiters)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[key][1]
            if users > 1:
                self._locks[key] = (lock, users - 1)
            else:
                del self._locks[key]
