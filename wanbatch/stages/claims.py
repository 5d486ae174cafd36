"""What an item holds while its create may cost: a place among the lane's open tasks and its price in the budget.

A claim is opened before a create is sent: it takes one of the lane's places
(the model's concurrency plus a small backlog) and reserves the item's full
price (n images at the price stored when it was planned: the most it can
cost). It ends once, one of two ways::

    open ──▶ in doubt ──▶ open          (the create's answer was lost; the reconciler found its task)
      │          │
      ├──────────┴─▶ settled            the task ended: what it was billed is spent, the place is back
      └──────────┴─▶ released           proven no task: the place is back, the reservation dropped

An item whose create's outcome is unknown keeps its claim, in doubt, until
the reconciler decides: a task may exist, hold a place on the service and be
billed, so the budget counts its price as spent until the task list proves
there is none.

Ending a claim is idempotent: a second settle or release does nothing, so a
stage that ends an item need not know whether another ended it first. This
module is the only path by which places and reservations move.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from wanbatch.ledger.records import ItemRow
from wanbatch.stages.budget import Budget

__all__ = ["Claim", "ClaimState", "Claims", "Refusal", "full_price"]


class ClaimState(enum.StrEnum):
    """Where a claim is in its life."""

    #: A place taken and the full price reserved: the create is in flight, or its task is open.
    open = "open"
    #: The create's outcome is unknown: place and price are kept until the reconciler decides.
    in_doubt = "in doubt"
    #: The task ended: what the service billed is spent, the place given back. Final.
    settled = "settled"
    #: It is proven there is no task: the place given back, the reservation dropped. Final.
    released = "released"


ENDED = frozenset({ClaimState.settled, ClaimState.released})


class Refusal(enum.StrEnum):
    """Why a claim was not opened: the item is not sent."""

    #: The price would take what is spent and reserved past the budget: nothing more is sent.
    budget = "budget reached"
    #: Submitting was told to stop before a place came free.
    stopped = "stopped"


def full_price(row: ItemRow) -> float:
    """The most an item can cost: every image it asks for, at the price stored when it was planned."""
    return row.n_images * row.price_per_image


@dataclass(eq=False, slots=True)
class Claim:
    """One item's place and reservation, from before its create until its task ends or is proven never made."""

    item_id: str
    price: float  #: the full price reserved for it
    _owner: Claims = field(repr=False)
    state: ClaimState = ClaimState.open

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def doubt(self) -> None:
        """The create's outcome is unknown: keep place and price until the reconciler decides."""
        if self.state is ClaimState.open:
            self.state = ClaimState.in_doubt

    def confirm(self) -> None:
        """The reconciler found the task of a create in doubt: the claim is an open task's again."""
        if self.state is ClaimState.in_doubt:
            self.state = ClaimState.open

    def settle(self, billed: float) -> None:
        """The task ended (or is counted as paid): ``billed`` is spent, the place given back. Once only."""
        if not self.ended:
            self.state = ClaimState.settled
            self._owner._end(self, billed)

    def release(self) -> None:
        """No task was made: the place given back, the reservation dropped, nothing spent. Once only."""
        if not self.ended:
            self.state = ClaimState.released
            self._owner._end(self, 0.0)


class Claims:
    """One lane's claims: its places for open tasks, and the budget that every lane shares.

    On resume more tasks may be open than there are places (a smaller backlog, a lower quota); they all hold
    a claim, and no new one opens until enough have ended.
    """

    def __init__(self, capacity: int, budget: Budget, *, freed: asyncio.Event | None = None) -> None:
        """``freed``: an event set whenever a place comes free (shared by the lanes of one reader, which waits
        for a place on any of them)."""
        self.capacity = capacity
        self.budget = budget
        self._live: dict[str, Claim] = {}  #: item_id -> its claim, while it has not ended
        self._freed = freed or asyncio.Event()

    @property
    def free(self) -> bool:
        """Whether a claim opened now would have a place at once."""
        return self.taken < self.capacity

    @property
    def taken(self) -> int:
        """Places held by claims that have not ended."""
        return len(self._live)

    async def open(self, row: ItemRow, stop: asyncio.Event) -> Claim | Refusal:
        """Reserve the item's full price, then wait for a place; or say why not.

        The price is reserved first, so the budget is spent in manifest order whatever the places do."""
        self._check_unclaimed(row.item_id)
        price = full_price(row)
        if not self.budget.reserve(row.item_id, price):
            return Refusal.budget
        claim = Claim(row.item_id, price, self)  # its price reserved; its place is taken below, once one is free
        while self.taken >= self.capacity and not stop.is_set():
            self._freed.clear()
            waiters = [asyncio.ensure_future(self._freed.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if stop.is_set():
            claim.release()  # the reservation dropped the one way every claim's is
            return Refusal.stopped
        self._live[row.item_id] = claim
        return claim

    def resume(self, row: ItemRow) -> Claim:
        """A claim for a task an earlier run left open: it holds a place on the service already, and its price
        is reserved whatever the budget says (it may have been billed)."""
        self._check_unclaimed(row.item_id)
        price = full_price(row)
        self.budget.reserve(row.item_id, price, force=True)
        claim = self._live[row.item_id] = Claim(row.item_id, price, self)
        return claim

    def _check_unclaimed(self, item_id: str) -> None:
        if item_id in self._live:
            # Two claims for one item would be two creates of it in flight: paid twice.
            raise RuntimeError(f"{item_id} already holds a claim ({self._live[item_id].state})")

    def _end(self, claim: Claim, billed: float) -> None:
        """Called once per claim, by the claim itself (one refused for a stop never held a place)."""
        if self._live.get(claim.item_id) is claim:
            del self._live[claim.item_id]
        self.budget.settle(claim.item_id, billed)
        self._freed.set()
