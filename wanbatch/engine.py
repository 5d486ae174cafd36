"""Wiring the stages: manifest → ledger → submit → track → download → outputs.

The engine owns no logic of its own beyond order: it fills the ledger from
the manifest, turns what the ledger says is open into the stages' work
(so a resumed run and a fresh one take the same path), runs the stages
concurrently and writes the outputs. The stages end in order: submitting
ends when nothing is left to send, tracking when no task is open, saving
when no image it could still save is pending (once the user stopped the run,
when none is ready to be tried).

What a run settles in its ledger before its stages start is
:mod:`wanbatch.stages.startup`'s; the stages are built, run in order and
counted by :mod:`wanbatch.stages.assembly`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from wanbatch.clock import Clock, ScaledClock
from wanbatch.fleet.config import FleetConfig
from wanbatch.ledger import RunLedger, RunLock, open_ledger
from wanbatch.ledger.backend import claim as claim_backend
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import OPEN_STATES, ItemState
from wanbatch.manifest import Manifest, naming
from wanbatch.outputs.finish import write_outputs
from wanbatch.outputs.gallery import Thumbnailer
from wanbatch.outputs.location import HERE, mark_state, record_outputs
from wanbatch.outputs.metadata import POOL_META, build_report
from wanbatch.outputs.stores import Store
from wanbatch.service.accounts import Account
from wanbatch.service.quotas import QuotaTable
from wanbatch.stages.assembly import Stages, build_stages, halted, run_in_order
from wanbatch.stages.budget import Budget
from wanbatch.stages.download import DownloadConfig, Downloader
from wanbatch.stages.intake import MANIFEST_META, check_manifest_record, plan_into
from wanbatch.stages.pool import check_in_flight, plan_lanes
from wanbatch.stages.reconcile import ReconcileConfig
from wanbatch.stages.resume import resume_open
from wanbatch.stages.startup import RESUMABLE_STATES, continue_clock, settle_what_a_stop_left
from wanbatch.stages.submit import SubmitConfig, Submitter
from wanbatch.stages.track import Tracker, TrackerConfig

if TYPE_CHECKING:
    from wanbatch.fleet.worker import FleetWorker

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    base_url: str | None = None  #: one endpoint for every region (a simulator, a proxy)
    base_urls: Mapping[str, str] = field(default_factory=dict)  #: per region, over base_url
    speed: float = 1.0  #: how much faster than real time the service's clock runs (simulators only)
    query_qps: float = 18.0  #: below the account's 20 per second for query, list and cancel
    request_timeout_s: float = 60.0
    sync_timeout_s: float = 330.0  #: wan2.6's sync endpoint holds its answer up to 300 s
    gallery: bool = True  #: thumbnails as images are saved, gallery.html at the end of each run
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    track: TrackerConfig = field(default_factory=TrackerConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    #: the account's quotas where they differ from the catalog's (see wanbatch.service.quotas): the lanes pace to them
    quotas: QuotaTable = field(default_factory=dict)
    #: the endpoints the run folder is made against (:func:`wanbatch.ledger.backend.describe`), checked against and
    #: recorded in its ledger; None: neither (tests that point one folder at several simulators)
    backend: Mapping[str, str] | None = None
    force_backend: bool = False  #: resume even against other endpoints than the folder's record
    #: a PostgreSQL ledger (postgresql://...) shared by the workers of the batch, instead of the folder's SQLite one
    ledger_url: str | None = None
    batch: str | None = None  #: the batch's name in that ledger: its output location (default: the run folder)
    fleet: FleetConfig = field(default_factory=FleetConfig)  #: a worker's lease and heartbeat there


class Engine:
    """One run (or resume) of a manifest in a run folder."""

    def __init__(
        self,
        *,
        run_dir: Path,
        keys: Mapping[str, str] | None = None,
        accounts: Sequence[Account] | None = None,
        config: EngineConfig = EngineConfig(),
        clock: Clock | None = None,
        budget: float | None = None,
        retry_failed: bool = False,
        retry_moderated: bool = False,
        retry_held: bool = False,
        store: Store | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        #: Where the outputs go when not into ``run_dir`` (which then holds only the run's state).
        self.store = store
        #: Without a pool: one key per region (region -> key); with one, ``accounts`` (``keys`` is not used).
        self._keys = dict(keys or {})
        self._pool = tuple(accounts) if accounts is not None else None
        self.config = config
        self._own_clock = clock is None
        self.clock = clock or ScaledClock(speed=config.speed)
        self.budget_limit = budget
        self.retry_failed, self.retry_moderated = retry_failed, retry_moderated
        self.retry_held = retry_held  #: send once more the items held after two unknown outcomes with no task
        self.interrupted = False
        self._cancel_pending = False
        self._submitter: Submitter | None = None
        self._tracker: Tracker | None = None
        self._downloader: Downloader | None = None
        self._live: tuple | None = None  # (ledger, downloader, budget, started, at_start) while stages run
        self._final_snapshot: dict[str, Any] | None = None
        self._fleet: FleetWorker | None = None  #: this process as a worker of a batch in a shared ledger

    def interrupt(self, *, cancel_pending: bool = False) -> None:
        """Stop submitting; what is already paid for is still tracked and saved, but an image whose download
        keeps failing is not waited for: it stays pending for the next run.

        With ``cancel_pending`` the tasks still waiting on the service (not yet running, not yet billed)
        are canceled there too.
        """
        self.interrupted = True
        self._cancel_pending = self._cancel_pending or cancel_pending
        if self._submitter is not None:
            self._submitter.stop.set()
        if self._downloader is not None:
            self._downloader.interrupt()
        if self._tracker is not None and self._cancel_pending:
            self._tracker.cancel_pending()

    def _stop_submitting(self) -> None:
        """Nothing more is sent (the store refuses what would be paid for); what is paid for is still tracked."""
        if self._submitter is not None:
            self._submitter.stop.set()

    async def snapshot(self, *, final: bool = False) -> dict[str, Any] | None:
        """Counts per state, this run's progress and the counts it started from, for a live display; None before
        the stages start."""
        if self._live is None:
            return self._final_snapshot
        ledger, downloader, budget, started, at_start = self._live
        return {
            "at_start": at_start,
            "counts": {str(state): n for state, n in (await ledger.counts()).items()},
            "running": self._tracker.running if self._tracker and not final else 0,
            "images_saved": downloader.saved,
            "cost": budget.spent,
            "currency": "CNY",
            "elapsed_s": time.monotonic() - started,
        }

    async def run(self, manifest: Manifest, *, plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Plan the manifest into the ledger, run every open item to its end, write the outputs.

        ``plan`` (:func:`wanbatch.make_plan`'s) is kept in the ledger with the manifest's digest, so that a
        resume of the same manifest can take it from there (:func:`stored_plan`) instead of expanding again.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config.ledger_url is not None:
            return await self._run_as_worker(manifest, plan)
        with RunLock(self.run_dir):
            async with open_ledger(self.run_dir, clock=self.clock) as ledger:
                return await self._run_in(ledger, manifest, plan)

    async def _run_as_worker(self, manifest: Manifest, plan: Mapping[str, Any] | None) -> dict[str, Any]:
        """:meth:`run` as one worker of a batch in a shared ledger: no folder lock (other workers, on this machine
        or others, run the same batch); the fleet's membership, heartbeat and takeovers around the stages."""
        from wanbatch.fleet.worker import FleetWorker, new_worker_id  # the database driver is an extra

        where = self.config.batch or self.run_dir
        opened = open_ledger(
            self.run_dir, clock=self.clock, url=self.config.ledger_url, batch=where, worker=new_worker_id()
        )
        async with opened as ledger:
            self._fleet = FleetWorker(ledger, clock=self.clock, config=self.config.fleet)  # type: ignore[arg-type]
            return await self._run_in(ledger, manifest, plan)

    async def _run_in(self, ledger: RunLedger, manifest: Manifest, plan: Mapping[str, Any] | None) -> dict[str, Any]:
        """:meth:`run`, in the folder's locked and opened ``ledger``."""
        if self.config.backend is not None:
            await claim_backend(ledger, self.run_dir, self.config.backend, force=self.config.force_backend)
        await record_outputs(ledger, HERE if self.store is None else self.store.location)
        if self.store is not None and self._fleet is None:  # a shared ledger is no state folder to name
            await mark_state(ledger, self.store, self.run_dir)
        started, started_at = time.monotonic(), _iso_now()
        if self._own_clock and isinstance(self.clock, ScaledClock):
            await continue_clock(ledger, self.clock)
        if self._fleet is None:
            run = await ledger.begin_run()
            return await self._plan_and_run(ledger, manifest, plan, run, started, started_at)
        run = await self._fleet.join()
        beating = asyncio.create_task(self._fleet.heartbeat(on_lost=self.interrupt))
        try:
            return await self._plan_and_run(ledger, manifest, plan, run, started, started_at)
        finally:
            beating.cancel()

    async def _plan_and_run(
        self,
        ledger: RunLedger,
        manifest: Manifest,
        plan: Mapping[str, Any] | None,
        run: int,
        started: float,
        started_at: str,
    ) -> dict[str, Any]:
        """Plan the manifest into ``ledger`` as ``run``, run its stages, write the outputs; the report."""
        if self._fleet is not None:  # no folder holds the batch: its record is read here, from the database
            check_manifest_record(await ledger.meta(MANIFEST_META), ledger.path, manifest)
        if self._pool is not None:  # status and the report show figures per account of every pool used here
            known = [name for name in (await ledger.meta(POOL_META) or "").split(",") if name]
            await ledger.set_meta(POOL_META, ",".join(dict.fromkeys([*known, *(a.name for a in self._pool)])))
        held = await plan_into(ledger, manifest, run, plan)
        seen, added, stale = held.run, held.added, held.stale
        log.info(
            "plan: %d new item(s), %d already in the ledger, %d no longer in the manifest",
            added.added,
            added.existing,
            stale,
        )
        try:
            stages = await self._run_stages(ledger, seen, held.lanes)
        finally:
            if self._live is not None:
                self._final_snapshot = await self.snapshot(final=True)
            self._live = None  # the ledger closes as run() returns
        if self._fleet is not None:
            last = await self._fleet.leave()
            stages["fleet"] = {"worker": self._fleet.worker_id, "taken_over": self._fleet.taken_over, "last": last}
        written = self._fleet is None or stages["fleet"]["last"]  # a batch's outputs by its last worker alone
        report = await (write_outputs if written else _report_only)(
            self.run_dir,
            ledger,
            run=run,
            gallery=self.config.gallery,
            store=self.store,
            extra={
                "manifest": str(manifest.path),
                "name": manifest.name,
                "items_added": added.added,
                "items_existing": added.existing,
                "items_no_longer_in_manifest": stale,
                "items_in_manifest": {str(k): v for k, v in (await ledger.counts(run=seen)).items()},
                "interrupted": self.interrupted,
                "started_at": started_at,
                "ended_at": _iso_now(),
                "wall_s": round(time.monotonic() - started, 3),
                "images_per_min": round(
                    stages["images_saved_this_run"] / max(time.monotonic() - started, 1e-9) * 60, 2
                ),
                **stages,
            },
        )
        return report

    async def _run_stages(self, ledger: RunLedger, run: int, manifest_lanes: frozenset | None) -> dict[str, Any]:
        """``run``: the run whose marks say which items the manifest has (see :func:`_plan_into`);
        ``manifest_lanes``: the manifest's (region, model) pairs from its plan, when it is known."""
        # Checked before anything moves: an item in flight on an account this run has no key of is not followed.
        in_flight = await ledger.account_lanes(OPEN_STATES)
        check_in_flight(self._pool, in_flight)
        await settle_what_a_stop_left(ledger, run, retry_failed=self.retry_failed, retry_moderated=self.retry_moderated)
        budget = Budget(self.budget_limit, spent=await ledger.spent_cost())
        # Only the manifest's items are sent, so its plan names the lanes of what is planned; the other open
        # states are few and read from their index (planned would read every row of a big manifest).
        if manifest_lanes is None:
            lanes_wanted = await ledger.lanes(RESUMABLE_STATES)
        else:
            lanes_wanted = {(region, model) for region, _, model in in_flight} | manifest_lanes
        accounts, lane_keys, readers = plan_lanes(
            pool=self._pool, keys=self._keys, quotas=self.config.quotas, in_flight=in_flight, wanted=lanes_wanted
        )
        connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
        # With a store, the downloader makes each thumbnail from the image's bytes and stores it beside the image.
        thumbs = Thumbnailer(self.run_dir) if self.config.gallery and self.store is None else None
        async with aiohttp.ClientSession(connector=connector) as session, thumbs or contextlib.nullcontext():
            stages = build_stages(
                ledger,
                session,
                accounts,
                (lane_keys, readers),
                budget,
                run=run,
                clock=self.clock,
                config=self.config,
                run_dir=self.run_dir,
                store=self.store,
                thumbs=thumbs,
                sharded=await naming.sharded(ledger),
                retry_held=self.retry_held,
                shared=None if self._fleet is None else self._fleet.lane_parts,
                on_refused=self._stop_submitting,
                may_send=(lambda: True) if self._fleet is None else self._fleet.may_send,
            )
            self._submitter, self._tracker, self._downloader = stages.submitter, stages.tracker, stages.downloader
            if self.interrupted:
                self.interrupt(cancel_pending=self._cancel_pending)
            # Where the runs before this one left the folder: the display's "this run" figures are the rest.
            summary = await ledger.summary()
            at_start = {"counts": summary["items"], "images_saved": summary["images"]["saved"], "cost": budget.spent}
            await self._refill(ledger, stages)
            self._live = (ledger, stages.downloader, budget, time.monotonic(), at_start)
            await run_in_order(
                stages.submitter.run if self._fleet is None else lambda: self._submit_and_watch(ledger, stages),
                stages.reconciler.run,
                stages.tracker.run,
                stages.downloader.run,
            )
        stats = stages.stats(budget)
        stats["halted"] = bool(stats["blocked"]) and await halted(ledger, stages.lanes.values(), run)
        return stats

    async def _submit_and_watch(self, ledger: RunLedger, stages: Stages) -> None:
        """A fleet worker's first stage: submit, and meanwhile take over workers that die, handing their items to
        this worker's stages; it ends once this worker has nothing more to send and no other holds open work, so
        that the later stages stay to finish whatever is taken over until then."""
        assert self._fleet is not None
        done = asyncio.Event()

        async def resume(rows: list[ItemRow]) -> None:
            await self._resume(ledger, stages, rows, "taken over from a worker silent past its lease")

        async with asyncio.TaskGroup() as group:
            watching = self._fleet.watch(
                resume, done, stages.submitter.stop, manifest_run=stages.submitter.manifest_run
            )
            group.create_task(watching)
            try:
                await stages.submitter.run()
            finally:
                done.set()

    async def _refill(self, ledger: RunLedger, stages: Stages) -> None:
        """Turn the ledger's open items into work: the same path for a fresh run and a resume."""
        for state in (ItemState.queued, ItemState.unknown):
            await self._resume(ledger, stages, [row async for row in ledger.iter_items([state])], "found on start")
        await stages.downloader.load_pending()

    async def _resume(self, ledger: RunLedger, stages: Stages, rows: list[ItemRow], why: str) -> None:
        """Hand open items (found on start, or a dead worker's taken over) to the stages that finish them."""
        await resume_open(
            ledger,
            rows,
            lanes=stages.lanes,
            tracker=stages.tracker,
            reconciler=stages.reconciler,
            downloader=stages.downloader,
            now_s=self.clock.now(),
            why=why,
        )


async def _report_only(
    run_dir: Path, ledger: RunLedger, *, run: int, extra: dict[str, Any], gallery: bool, store: Store | None = None
) -> dict[str, Any]:
    """What :func:`write_outputs` returns, written nowhere: a worker that is not its batch's last to leave leaves
    the outputs to that one, which writes them once every other worker's work is in the ledger."""
    return await build_report(ledger, run=run, extra=extra)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
