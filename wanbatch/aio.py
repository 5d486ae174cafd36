"""Small asyncio helpers the stages share."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Clear ``event`` and wait up to ``timeout_s`` wall seconds for it to be set again; True if it was."""
    event.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))
        return True
    return False
