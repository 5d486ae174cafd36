"""The clocks: a manual one that moves only when a test steps it, and waits that run in clock time."""

from __future__ import annotations

import asyncio
import math

import pytest

from wanbatch.clock import ManualClock, ScaledClock


async def test_a_manual_sleep_returns_when_the_clock_reaches_its_deadline():
    """A sleeper on a manual clock wakes when the clock is stepped to its deadline, not before."""
    clock = ManualClock(start_s=100.0)
    sleeper = asyncio.create_task(clock.sleep(10.0))
    await asyncio.sleep(0)
    clock.advance(9.0)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(1.0)
    await asyncio.wait_for(sleeper, 1.0)
    assert clock.now() == 110.0


async def test_a_manual_wait_ends_on_the_event_or_on_the_clock():
    """wait_event returns True when the event is set, False when the manual clock passes the timeout."""
    clock, event = ManualClock(), asyncio.Event()
    waiter = asyncio.create_task(clock.wait_event(event, 5.0))
    await asyncio.sleep(0)
    event.set()
    assert await asyncio.wait_for(waiter, 1.0) is True
    waiter = asyncio.create_task(clock.wait_event(event, 5.0))
    await asyncio.sleep(0)
    clock.advance(5.0)
    assert await asyncio.wait_for(waiter, 1.0) is False


async def test_a_manual_wait_can_be_bounded_in_wall_time():
    """at_most_wall_s ends a wait for something no event announces, though the manual clock stands still."""
    clock = ManualClock()
    assert await asyncio.wait_for(clock.wait_event(asyncio.Event(), 3600.0, at_most_wall_s=0.01), 1.0) is False


async def test_a_manual_wait_with_no_end_in_clock_time_keeps_no_alarm():
    """A wait that only a wall bound ends (math.inf clock seconds) leaves nothing behind among the sleepers, so a
    stage that waits so every second does not grow the clock's heap for ever."""
    clock = ManualClock()
    assert await clock.wait_event(asyncio.Event(), math.inf, at_most_wall_s=0.01) is False
    assert clock._sleepers == []
    clock.advance(10**9)  # no step of time ends it either, and nothing stays to wake


def test_a_manual_clock_never_goes_backwards():
    """Stepping back is refused, as on the scaled clock."""
    clock = ManualClock(start_s=50.0)
    with pytest.raises(ValueError):
        clock.set(49.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)


async def test_a_scaled_wait_is_in_clock_seconds():
    """On a clock 1000 times faster than the wall, a 10 s clock-time wait takes about 10 ms of wall time."""
    clock = ScaledClock(speed=1000.0)
    assert clock.to_wall_s(10.0) == pytest.approx(0.01)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await clock.wait_event(asyncio.Event(), 10.0) is False
    assert 0.009 <= loop.time() - began < 0.5
