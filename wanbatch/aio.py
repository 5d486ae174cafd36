"""Small asyncio helpers the stages share."""

from __future__ import annotations

import asyncio
import contextlib
import signal

__all__ = ["stop_on_signals", "wait_event"]


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
