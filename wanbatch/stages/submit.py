"""Creating tasks: paced to the quota, each item POSTed at most once.

One lane per (account, model) carries the account's submit rate for that
model and a bound on how many of its tasks we keep open on the service: the
model's concurrency plus a small backlog, enough that a slot freed there is
filled at once, few enough that a stop leaves little paid work queued. The
lanes of one (region, model) share one reader of the planned rows
(:mod:`wanbatch.stages.reader`), which gives each item to the account with a
free place at the time it is sent.

Here: the readers' passes over the planned rows, each item's claim (its price
and a place) and its pace. Each create is then sent by
:class:`wanbatch.stages.send.ItemSender`, which holds the money rule: the item
is committed as ``submitting`` before the POST; an error response or a
connection that never opened proves no task was made and the item may go
again; anything else leaves it ``unknown`` for the reconciler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from wanbatch.clock import Clock
from wanbatch.errors import (
    ApiError,
)
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.stages.claims import Claim, Refusal
from wanbatch.stages.lane import SYNC_KEY, Lane
from wanbatch.stages.pool import block_lanes
from wanbatch.stages.reader import HELD, Reader
from wanbatch.stages.reconcile import Reconciler
from wanbatch.stages.send import ItemSender, Sent
from wanbatch.stages.track import Tracker

__all__ = ["SubmitConfig", "Submitter"]

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitConfig:
    backlog: int = 2  #: tasks kept waiting on the service beyond its concurrency
    attempts: int = 8  #: tries per item for transient errors before leaving it for a later run
    retry_base_s: float = 2.0
    retry_max_s: float = 60.0
    batch: int = 200  #: planned items read from the ledger at a time
    sync_wan26: bool = False  #: use wan2.6's synchronous endpoint
    unreachable_after: int = 8  #: connections failing in a row before a lane stops (the service is not there)
    #: a lane's first create goes alone until answered, or for this long (our clock): an account's refusal (arrears,
    #: a wrong key, a model not bought) comes back at once, so a burst is never sent on a key that is refused
    probe_s: float = 2.0


class Submitter:
    """One reader per (region, model) over the planned rows, handing each item to a lane with a place and its
    pace; each create is sent by the :class:`ItemSender`."""

    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock: Clock,
        lanes: list[Lane],
        tracker: Tracker,
        reconciler: Reconciler,
        on_sync_images: Callable[[ItemRow, Claim, dict], Awaitable[None]],
        config: SubmitConfig,
        run: int | None = None,
        readers: Mapping[tuple[str, str], list[Lane]] | None = None,
        may_send: Callable[[], bool] = lambda: True,
    ) -> None:
        """``readers``: the lanes each reader of planned rows sends through, by the (region, model) of the rows
        it reads (a region value: one region, ``beijing|singapore`` or ``any``); by default each (region,
        model) of ``lanes`` reads its own. ``may_send``: asked just before each request that creates a task
        (a fleet's worker answers whether its lease is surely still its own)."""
        self._ledger, self._clock, self.lanes = ledger, clock, lanes
        self.config: SubmitConfig = config
        self.manifest_run = run  #: only items the current manifest still has (seen in this run) are sent
        self.stop = asyncio.Event()  #: set by a signal or the budget: submit nothing more
        self._readers = readers
        self._sender = ItemSender(
            ledger=ledger,
            clock=clock,
            tracker=tracker,
            reconciler=reconciler,
            on_sync_images=on_sync_images,
            config=config,
            stop=self.stop,
            block=self.block,
            may_send=may_send,
        )

    @property
    def submitted(self) -> int:
        """Creates that made a task (or a sync answer) in this run."""
        return self._sender.submitted

    async def run(self) -> None:
        # One reader of the planned rows per (region, model), whatever the number of accounts serving it: two
        # readers would race for the same rows (the ledger's compare-and-set would still stop a second POST).
        readers: dict[tuple[str, str], list[Lane]] = dict(self._readers or {})
        if self._readers is None:
            for lane in self.lanes:
                readers.setdefault((lane.region, lane.model), []).append(lane)
        async with asyncio.TaskGroup() as group:
            for (region, _), lanes in readers.items():
                if not lanes:
                    continue
                reader = Reader(lanes, region=region, clock=self._clock, probe_s=self.config.probe_s, stop=self.stop)
                group.create_task(self._reader_loop(reader, group))

    def block(self, lane: Lane, error: ApiError) -> None:
        """Stop submitting what ``error`` affects: the whole key (its account) for account errors, else this
        model on it. The same model's lanes on other accounts go on, and take the planned items."""
        block_lanes(self.lanes, lane, error)

    async def _reader_loop(self, reader: Reader, group: asyncio.TaskGroup) -> None:
        """Send the planned items of one (region, model) through its lanes (one per account) until none is left."""
        held_before = False
        while not reader.stopped:
            sent, held = await self._pass(reader, group)
            if sent and not held:
                continue
            if not held and not reader.in_doubt():
                where = {"run": self.manifest_run, "region": reader.region, "model": reader.model}
                held_now = await self._ledger.held_elsewhere(**where)
                if not (held_now or held_before):
                    return
                # Other workers of a shared ledger hold items that may come to this one (their worker stops or
                # dies, and is taken over): look again rather than end; and once they are given back, one pass
                # more, since they may have been given back after this pass looked.
                held_before = held_now
                if held_now:
                    await self._clock.wait_event(reader.changed, math.inf, at_most_wall_s=1.0)
                continue
            # Creates are in flight or in doubt (an item may come back to planned, or wait on one with its
            # prompt): look again once one settles, or once a lane's first create stops holding the others
            # back. A stop announces itself to no lane: it is looked for at least once a wall second.
            await self._clock.wait_event(reader.changed, reader.probe_left_s(), at_most_wall_s=1.0)

    async def _pass(self, reader: Reader, group: asyncio.TaskGroup) -> tuple[int, int]:
        """Send the reader's planned items in manifest order, each through the lane (account) that can send it
        now (see :class:`Reader`); returns (sent, held back)."""
        sent = held = after_seq = 0
        # A lane whose creates all share one doubt key reads no rows while one is in doubt, and then only a few:
        # it sends one and must wait for its answer before the next.
        limit = 8 if reader.one_at_a_time else self.config.batch
        while not reader.stopped:
            if reader.waits_on_doubt:
                return sent, held + 1
            rows = await self._ledger.take_planned(
                run=self.manifest_run, region=reader.region, model=reader.model, after_seq=after_seq, limit=limit
            )
            if not rows:
                break
            # Only these lanes' submits move a planned item (the folder is locked to this process), so a row read
            # while its item had no submit under way is still planned when its turn comes. One whose submit (an
            # earlier pass's, retrying) was under way may have been sent since: its state is read again before it
            # takes a claim and a slot of the account's pace. The compare-and-set in the sender's _attempt would
            # refuse it anyway, but only after spending that slot, and with a warning that reads like a fault.
            in_doubt = reader.in_doubt()
            moving = {row.item_id for row in rows if row.item_id in in_doubt}
            for row in rows:
                if not reader.ready():
                    return sent, held + 1  # each lane's first create is out alone: look again once answered
                after_seq = row.seq
                if reader.passed_over(row.item_id):
                    continue
                if row.item_id in moving and await self._ledger.state_of(row.item_id) is not ItemState.planned:
                    continue  # its submit ended after the read: it has moved on
                lane = await reader.lane_for(row)
                if lane is None:
                    return sent, held + 1  # every lane is probing, or stopped
                if lane is HELD:
                    held += 1
                    if all(other.one_at_a_time for other in reader.ready()):
                        return sent, held  # later rows wait too
                    continue
                if not await self._dispatch(lane, row, group):
                    return sent, held
                sent += 1
        return sent, held

    async def _dispatch(self, lane: Lane, row: ItemRow, group: asyncio.TaskGroup) -> bool:
        """Open the item's claim (its price and a place), wait for the pace, start the submit; False when
        submitting must stop."""
        placed = lane.placed(row)
        if placed:  # allowed several regions: it goes to this lane's, at its price there (what its claim reserves)
            row = dataclasses.replace(row, **placed)
        claim = await lane.claims.open(row, self.stop)
        if claim is Refusal.budget:
            log.warning(
                "■ budget of %.2f %s reached: nothing more is submitted", lane.claims.budget.limit, row.currency
            )
            self.stop.set()
            return False
        if isinstance(claim, Refusal):
            return False
        await lane.pacer.wait()
        # Looked at after the wait: an account's refusal or a stop may have come back while this create waited.
        if lane.blocked or self.stop.is_set():
            claim.release()
            return False
        if lane.probe_started_s is None:
            lane.probe_started_s = self._clock.now()
        # A lost sync answer is never sent again, so it leaves nothing to tell apart: a key of its own.
        lane.doubt[row.item_id] = f"{SYNC_KEY}{row.item_id}" if self._sender.is_sync(lane, row) else lane.doubt_key(row)
        group.create_task(self._submit(lane, row, claim))
        return True

    async def _submit(self, lane: Lane, row: ItemRow, claim: Claim) -> None:
        sent = Sent.done
        try:
            sent = await self._sender.send(lane, row, claim)
        finally:
            if not lane.answered:
                lane.answered = True
                lane.changed.set()
            if sent is not Sent.in_doubt:
                lane.settle_doubt(row.item_id)  # an unknown one stays in doubt until reconciled
            if sent is Sent.done:
                claim.release()  # never made; a final one (a sync result, a write-off) was settled already
