"""The four stages of one run: built over its lanes, run at once and ended in order, and their figures.

:func:`build_stages` makes one client and query limiter per account, one lane per (account, model) and the
stages that share them (submit, reconcile, track, download), wired to one another as the engine runs them;
:func:`run_in_order` runs them under one task group, each told to finish once the stage before it has;
:meth:`Stages.stats` and :func:`halted` are what they did, for the run's report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from wanbatch.catalog import regions_of
from wanbatch.clock import Clock
from wanbatch.errors import HALTING_CODES
from wanbatch.ledger import RunLedger
from wanbatch.ledger.states import ItemState
from wanbatch.outputs.gallery import Thumbnailer
from wanbatch.outputs.stores import Store
from wanbatch.service.accounts import Account
from wanbatch.stages.budget import Budget
from wanbatch.stages.download import Downloader
from wanbatch.stages.lane import Lane
from wanbatch.stages.pool import LaneKey, SharedParts, account_figures, build_lanes
from wanbatch.stages.reconcile import Reconciler
from wanbatch.stages.submit import Submitter
from wanbatch.stages.track import Tracker

if TYPE_CHECKING:
    from wanbatch.engine import EngineConfig  # the engine's settings of its stages, read here only

__all__ = ["Stages", "build_stages", "halted", "run_in_order"]


@dataclass(frozen=True, slots=True)
class Stages:
    """One run's lanes and the four stages over them."""

    lanes: dict[LaneKey, Lane]
    submitter: Submitter
    tracker: Tracker
    reconciler: Reconciler
    downloader: Downloader

    def stats(self, budget: Budget) -> dict[str, Any]:
        """This run's figures for the report."""
        return {
            "submitted": self.submitter.submitted,
            "queries": self.tracker.queries,
            "lists": self.tracker.lists,
            "canceled_on_service": self.tracker.canceled,
            "reconciled_adopted": self.reconciler.adopted,
            "reconciled_resent": self.reconciler.resent,
            "reconciled_held": self.reconciler.held,
            "images_saved_this_run": self.downloader.saved,
            "bytes_saved_this_run": self.downloader.bytes,
            "blocked": {
                lane.label: f"{lane.blocked.code}: {lane.blocked.message}"
                for lane in self.lanes.values()
                if lane.blocked
            },
            **account_figures(self.lanes.values()),
            "budget": {"limit": budget.limit, "committed": round(budget.committed, 6), "reached": budget.exhausted},
        }


def build_stages(
    ledger: RunLedger,
    session: aiohttp.ClientSession,
    accounts: Mapping[str, Account],
    lane_plan: tuple[AbstractSet[LaneKey], Mapping[tuple[str, str], list[LaneKey]]],
    budget: Budget,
    *,
    run: int,
    clock: Clock,
    config: EngineConfig,
    run_dir: Path,
    store: Store | None,
    thumbs: Thumbnailer | None,
    sharded: bool,
    retry_held: bool,
    shared: SharedParts | None,
    on_refused: Callable[[], None],
    may_send: Callable[[], bool],
) -> Stages:
    """One client and query limiter per account (its key: without a pool, each region's), one lane per
    (account, model), and the four stages.

    ``shared``: what makes a lane's pacer and claims when a fleet's workers share them (None: the lane's own);
    ``on_refused``: told when the store refuses what would be paid for; ``may_send``: asked before each create
    (a fleet's worker answers whether its lease is surely still its own)."""
    lanes, limiters = build_lanes(
        session,
        accounts,
        lane_plan[0],
        budget,
        clock=clock,
        base_url=config.base_url,
        base_urls=config.base_urls,
        query_qps=config.query_qps,
        request_timeout_s=config.request_timeout_s,
        sync_timeout_s=config.sync_timeout_s,
        backlog=config.submit.backlog,
        shared=shared,
    )
    downloader = Downloader(
        ledger=ledger,
        clock=clock,
        session=session,
        run_dir=run_dir,
        config=config.download,
        on_item_done=thumbs.item_done if thumbs else lambda settled: None,
        on_refused=on_refused,
        store=store,
        thumbnails=config.gallery,
        sharded=sharded,
    )
    tracker = Tracker(
        ledger=ledger,
        clock=clock,
        limiters=limiters,
        on_images=downloader.add_recorded,
        config=config.track,
    )
    reconciler = Reconciler(
        ledger=ledger,
        clock=clock,
        limiters=limiters,
        tracker=tracker,
        config=config.reconcile,
        retry_held=retry_held,
    )
    submitter = Submitter(
        ledger=ledger,
        clock=clock,
        lanes=list(lanes.values()),
        readers={key: [lanes[lane] for lane in keyed] for key, keyed in lane_plan[1].items()},
        tracker=tracker,
        reconciler=reconciler,
        on_sync_images=tracker.record_sync,
        config=config.submit,
        run=run,
        may_send=may_send,
    )
    return Stages(lanes, submitter, tracker, reconciler, downloader)


async def run_in_order(first: Callable[[], Awaitable[None]], *rest: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run every stage at once; each of ``rest`` is told to finish once the stage before it has."""
    events = [asyncio.Event() for _ in range(len(rest) + 1)]

    async def staged(index: int, make: Callable[[], Awaitable[None]]) -> None:
        try:
            await make()
        finally:
            events[index].set()

    async with asyncio.TaskGroup() as group:
        group.create_task(staged(0, first))
        for index, stage in enumerate(rest, start=1):
            group.create_task(staged(index, lambda stage=stage, index=index: stage(events[index - 1])))


async def halted(ledger: RunLedger, lanes: Iterable[Lane], run: int) -> bool:
    """Whether every (region, model) that still has items of this manifest (seen in ``run``) to send had each of
    its lanes (one per account) stopped by the key, the account or the network; a model refused alone is not."""
    open_pairs = {
        (lane.region, lane.model)
        for lane in lanes
        if not (lane.blocked is not None and lane.blocked.code in HALTING_CODES)
    }
    left = await ledger.lanes([ItemState.planned], run=run)
    # An item allowed several regions (its region value "beijing|singapore" or "any") waits on any of them.
    alive = {(value, model) for value, model in left if any((r, model) in open_pairs for r in regions_of(value, model))}
    return bool(left) and not alive
