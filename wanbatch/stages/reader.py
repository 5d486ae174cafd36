"""One reader of the planned rows per (region, model), and which of its lanes sends each row.

The lanes of one (region, model) are one per account (without a pool, one:
the region's key). Their reader hands each planned row, in manifest order, to
the lane that can send it now: not stopped by its account, not waiting for
the answer to its first create (a refused key answers at once, so a burst is
never sent on it), none of its creates in doubt that the account's task list
could not tell from this one, a free place among its open tasks; of those,
one where it would start at once rather than queue on the service, then the
one whose pace frees soonest. One reader, so that two lanes never race
for the same rows; the ledger's compare-and-set planned -> submitting is still
the last guard of "sent at most once".
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from wanbatch.clock import Clock
from wanbatch.ledger.records import ItemRow
from wanbatch.stages.lane import Lane

__all__ = ["HELD", "Reader"]

#: What :meth:`Reader.lane_for` answers when every lane that could send a row has a create in doubt it would be
#: mixed up with.
HELD: Any = object()


class Reader:
    """The lanes of one (region, model), one per account, and the choice of the lane that sends a row."""

    def __init__(
        self, lanes: list[Lane], *, region: str | None = None, clock: Clock, probe_s: float, stop: asyncio.Event
    ) -> None:
        """``region``: the region value of the rows it reads (default: its lanes' region); for items allowed
        several regions, their joined list or ``any``, its lanes in each of them."""
        self.lanes, self._clock, self._probe_s, self._stop = lanes, clock, probe_s, stop
        self.region, self.model = region or lanes[0].region, lanes[0].model
        #: set when any lane frees a place, settles a doubt or has its first create answered (the lanes share it)
        self.changed = lanes[0].changed

    @property
    def stopped(self) -> bool:
        """Submitting is stopped, or every lane was stopped by its account or the model's refusal."""
        return self._stop.is_set() or all(lane.blocked for lane in self.lanes)

    @property
    def one_at_a_time(self) -> bool:
        """Whether a lane shares one doubt key among all its creates (then few rows are read at a time)."""
        return any(lane.one_at_a_time for lane in self.lanes)

    @property
    def waits_on_doubt(self) -> bool:
        """Whether every lane still open must wait: each shares one doubt key and has a create in doubt."""
        return all(lane.one_at_a_time and lane.async_in_doubt for lane in self.lanes if not lane.blocked)

    def in_doubt(self) -> set[str]:
        """The items whose create is in flight or in doubt on some lane."""
        return {item_id for lane in self.lanes for item_id in lane.doubt}

    def passed_over(self, item_id: str) -> bool:
        """Whether the item is in flight or in doubt, or left for a later run after transient errors."""
        return any(item_id in lane.skipped or item_id in lane.doubt for lane in self.lanes)

    def probing(self, lane: Lane) -> bool:
        """Whether the lane's first create is still out alone (see ``SubmitConfig.probe_s``)."""
        started_s = lane.probe_started_s
        return not lane.answered and started_s is not None and self._clock.now() - started_s < self._probe_s

    def ready(self) -> list[Lane]:
        """The lanes that may send now: not stopped, and not waiting for the answer to their first create."""
        return [lane for lane in self.lanes if not lane.blocked and not self.probing(lane)]

    def probe_left_s(self) -> float:
        """Our clock's seconds until the first lane whose first create holds its others back stops doing so;
        inf when none does."""
        left = [
            lane.probe_started_s + self._probe_s - self._clock.now()
            for lane in self.lanes
            if lane.probe_started_s is not None and self.probing(lane)
        ]
        return min(left, default=math.inf)

    async def lane_for(self, row: ItemRow) -> Lane | None:
        """The lane that sends ``row`` now; :data:`HELD` when each lane that could send it has a create in doubt
        that its task list could not tell from it; None when no lane can send at all (stopped, or probing).

        Every account's places taken: wait for the first to free one. A lone lane takes the row even without a
        free place (its claim waits for one), as a run without a pool always did."""
        while not self.stopped:
            ready = self.ready()
            if not ready:
                return None
            # The service's task list tells tasks apart by prompt only: while one create with this prompt is
            # unanswered on an account, a second there would make an unknown outcome ambiguous.
            fitting = [lane for lane in ready if lane.doubt_key(row) not in lane.doubt.values()]
            if not fitting:
                return HELD
            placed = [lane for lane in fitting if lane.claims.free]
            if placed or len(fitting) == 1 == len(ready):
                return min(placed or fitting, key=_preference)
            await self._clock.wait_event(self.changed, self.probe_left_s(), at_most_wall_s=1.0)
        return None


def _preference(lane: Lane) -> tuple[bool, float, float]:
    """Lanes first where the item would start at once (fewer open tasks than the account's concurrency) rather
    than wait in the service's queue behind them, then the soonest pace, then the emptiest."""
    taken = lane.claims.taken
    return (taken >= lane.offer.concurrency, lane.pacer.ready_in_wall_s(), taken / lane.claims.capacity)
