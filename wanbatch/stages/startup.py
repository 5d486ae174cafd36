"""What a run does in its ledger before its stages start: the folder's clock, and what a stop left.

A resumed run continues the clock of the runs before it (:func:`continue_clock`), so every time the ledger holds
is on one timeline. What a stop left half done is settled before any stage reads the ledger
(:func:`settle_what_a_stop_left`): a create whose answer never came is in doubt, never sent again on faith; and
the items the user asked to try again (the retry switches) are planned again (:func:`plan_again`).
"""

from __future__ import annotations

import contextlib

from wanbatch.clock import ScaledClock
from wanbatch.errors import MODERATION_CODES, IllegalTransition
from wanbatch.ledger import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import OPEN_STATES, ItemState
from wanbatch.stages.results import sync_answer_lost

__all__ = ["RESUMABLE_STATES", "continue_clock", "plan_again", "settle_what_a_stop_left"]

#: The states of items whose task is (or may be) open: few, bounded by the lanes' places (their claims).
#: Where the items a run still has work on stand when it starts: planned, or open.
RESUMABLE_STATES = (ItemState.planned, *OPEN_STATES)


async def continue_clock(ledger: RunLedger, clock: ScaledClock) -> None:
    """Keep one timeline per run folder: a resumed run continues the clock of the runs before it."""
    saved = await ledger.meta("clock")
    if saved:
        speed, reading_s, wall_s = (float(part) for part in saved.split())
        if speed == clock.speed:
            clock.continue_from(reading_s, wall_s)
            return
    reading_s, wall_s = clock.anchor()
    await ledger.set_meta("clock", f"{clock.speed!r} {reading_s!r} {wall_s!r}")


async def settle_what_a_stop_left(ledger: RunLedger, run: int, *, retry_failed: bool, retry_moderated: bool) -> None:
    """Settle what a stop left half done, and put back the items the user asked to try again."""
    async for row in ledger.iter_items([ItemState.submitting, ItemState.unknown]):
        if row.endpoint == "sync":  # no list shows a sync call: its answer is lost, never to be sent again
            await sync_answer_lost(ledger, row, "stopped while the sync call was under way")
        elif row.state is ItemState.submitting:
            # A crash between the commit and the reply: the POST may have gone out.
            note = "found submitting on start: outcome unknown"
            await ledger.transition(row.item_id, ItemState.unknown, note=note)
    async for row in ledger.iter_items([ItemState.canceled], run=run):
        # Canceled before it was made, so nothing was paid: the manifest still asks for it.
        await plan_again(ledger, row, "canceled earlier; made on this run")
    if not (retry_failed or retry_moderated):
        return
    async for row in ledger.iter_items([ItemState.failed, ItemState.rejected], run=run):
        moderated = row.error_code in MODERATION_CODES
        wanted = retry_moderated if moderated else retry_failed and row.state is ItemState.failed
        if wanted:
            await plan_again(ledger, row, f"retry after {row.error_code}")


async def plan_again(ledger: RunLedger, row: ItemRow, note: str) -> None:
    """Plan a final item again; another worker of a shared ledger may have done so first, which is as good."""
    with contextlib.suppress(IllegalTransition):
        await ledger.transition(row.item_id, ItemState.planned, expect=row.state, note=note)
