"""Items found open, handed to the stage that finishes each: a resume's, and a dead worker's taken over.

An item may be found open two ways: at the start of a run (the folder's last run stopped or was killed with it
open), or, in a fleet, when a worker takes over one that fell silent. Both take this one path, so that a
takeover is exactly a resume:

- ``submitting``: the POST may have gone out. A sync call has no task to find: its answer is lost, counted as
  paid and never sent again; an async create is in doubt, for the reconciler to look for in the account's list.
- ``unknown``: in doubt, to the reconciler.
- ``queued``: its task is open, to the tracker (a sync answer found with its images recorded is generated; one
  without them is lost, as above).
- ``generated``: its images to the downloader.

Every item that holds (or may hold) a task takes a claim first: its place on the account and its price, which
it may have been billed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from wanbatch.errors import ConfigError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.stages.download import Downloader
from wanbatch.stages.lane import Lane
from wanbatch.stages.pool import LaneKey
from wanbatch.stages.reconcile import Reconciler
from wanbatch.stages.results import sync_answer_lost
from wanbatch.stages.track import Tracker

__all__ = ["resume_open"]


async def resume_open(
    ledger: RunLedger,
    rows: Iterable[ItemRow],
    *,
    lanes: Mapping[LaneKey, Lane],
    tracker: Tracker,
    reconciler: Reconciler,
    downloader: Downloader,
    now_s: float,
    why: str,
) -> None:
    """Hand each of ``rows`` (items found open; ``why``, for their notes) to the stage that finishes it."""
    for row in rows:
        if row.state is ItemState.submitting:
            if row.endpoint == "sync":  # no list shows a sync call: its answer is lost, never to be sent again
                await sync_answer_lost(ledger, row, f"{why} while the sync call was under way")
                continue
            row = await ledger.transition(
                row.item_id, ItemState.unknown, expect=ItemState.submitting, note=f"{why}: outcome unknown"
            )
        if row.state is ItemState.generated:
            await downloader.add_item(row.item_id)
            continue
        lane = lanes.get((row.region, row.account, row.model))
        if lane is None:  # a fleet's worker given another accounts file than the worker whose item this was
            raise ConfigError(
                f"item {row.item_id} is in flight on account {row.account or row.region!r}, which this process has"
                " no key of: start every worker of a batch with the same accounts file"
            )
        if row.state is ItemState.queued and not row.task_id and await ledger.images_of(row.item_id):
            await ledger.transition(row.item_id, ItemState.generated, note="sync answer recorded before a stop")
            await downloader.add_item(row.item_id)
            continue
        # Its task holds a place on the service already, and may have been billed.
        claim = lane.claims.resume(row)
        if row.state is ItemState.queued and not row.task_id:
            # A sync answer whose images were not recorded before a stop: nothing to ask for again.
            await sync_answer_lost(ledger, row, "stopped before the sync answer was recorded", claim)
        elif row.state is ItemState.unknown:
            lane.doubt[row.item_id] = lane.doubt_key(row)
            reconciler.add(lane, claim)
        else:
            # A folder's (and a batch's) clock continues across runs, so the recorded submit time is on ours.
            submitted_s = row.submit_started_ms / 1000 if row.submit_started_ms else now_s
            tracker.add(task_id=row.task_id, row=row, claim=claim, lane=lane, submitted_s=submitted_s, resumed=True)
