"""This process as one worker of a batch whose ledger is in PostgreSQL: what the engine asks of the fleet.

The engine runs a fleet worker as it runs a lone process, with four differences, all here:

- its run is the one the live workers share (:meth:`FleetWorker.join`), not a new one;
- its lanes pace and count places through the database (:meth:`FleetWorker.lane_parts`), so the workers
  together keep to each account's quota and the batch's budget;
- while its stages run, it beats, and takes over the workers found dead, handing their items to its own
  stages exactly as a resume hands a folder's open items (:meth:`FleetWorker.watch`); it stays until no
  other worker holds open work (a worker that ended early could not take over one that dies later);
- only the last worker to leave writes the outputs (:meth:`FleetWorker.leave`).

A worker that finds it was taken over (its heartbeat refused: it was silent past its lease) stops at once:
every item it held is another's, and its moves would be refused anyway (:class:`~wanbatch.errors.LeaseLost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from wanbatch.clock import Clock
from wanbatch.errors import LeaseLost
from wanbatch.fleet.members import FleetConfig, Membership, new_worker_id
from wanbatch.fleet.shared import PlaceWriter, SharedClaims, SharedPacer, lane_name
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.service.pacing import Pacer
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claims

__all__ = ["FleetWorker", "new_worker_id"]

log = logging.getLogger("wanbatch")


class FleetWorker:
    """One worker's membership, shared lanes and watch over the others, around its :class:`PgLedger`."""

    def __init__(self, database: PgLedger, *, clock: Clock, config: FleetConfig) -> None:
        """``database``: the batch's PostgreSQL ledger, opened for this worker (its pool holds the fleet's tables
        too, which no other ledger has)."""
        if database.worker is None:
            raise ValueError("a fleet worker's ledger is opened for it (open_ledger(..., worker=...))")
        ledger = self.ledger = database
        self.config, self._clock = config, clock
        self.worker_id = ledger.worker
        self.membership = Membership(ledger.pool, ledger.batch_id, worker_id=self.worker_id, clock=clock, config=config)
        self.writer = PlaceWriter(ledger.pool)
        self.taken_over = 0  #: items this worker took over from dead ones
        self.lost = False  #: this worker was taken over itself
        self._beaten_s = time.monotonic()  #: when its last heartbeat was written (this host's monotonic clock)

    async def join(self) -> int:
        asked_s = time.monotonic()
        run = await self.membership.join()
        self._beaten_s = asked_s
        log.info("⇄ fleet: worker %s joined run %d of %s", self.worker_id, run, self.ledger.path)
        return run

    def lane_parts(
        self,
        *,
        account: str,
        region: str,
        model: str,
        rate_per_s: float,
        capacity: int,
        budget: Budget,
        freed: asyncio.Event,
    ) -> tuple[Pacer, Claims]:
        """The pacer and claims of a lane whose quota every worker of every batch on that account shares."""
        name = lane_name(account, region)
        pacer = SharedPacer(rate_per_s, clock=self._clock, pool=self.ledger.pool, lane=name, model=model)
        claims = SharedClaims(
            capacity,
            budget,
            freed=freed,
            pool=self.ledger.pool,
            writer=self.writer,
            batch_id=self.ledger.batch_id,
            worker_id=self.worker_id,
            lane=name,
            model=model,
        )
        return pacer, claims

    async def heartbeat(self, on_lost: Callable[[], None]) -> None:
        """Beat every ``heartbeat_s`` until cancelled; on finding this worker taken over, call ``on_lost`` and
        stop beating. A beat that fails (the database away a moment) is tried again at the next one: the lease
        is many beats long."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            asked_s = time.monotonic()  # the beat is written after this: its lease runs from no earlier
            try:
                alive = await self.membership.beat()
            except Exception as exc:  # the database unreachable: the next beat tries again
                log.warning("! fleet: heartbeat failed: %s", exc)
                continue
            if alive:
                self._beaten_s = asked_s
                continue
            self.lost = True
            log.error("■ fleet: this worker was silent past its lease and taken over: stopping")
            on_lost()
            return

    def may_send(self) -> bool:
        """Whether this worker may send a create now: its last heartbeat is less than half a lease old, so no other
        worker can have taken it over (that takes a whole lease of silence, on the database's clock) before the
        request is out. A worker frozen between this answer and the request's first byte (a paused machine) is the
        one gap a lease cannot close: the service takes no token that would refuse a fenced worker's request."""
        return not self.lost and time.monotonic() - self._beaten_s < self.config.lease_s / 2

    async def watch(
        self,
        resume: Callable[[list[ItemRow]], Awaitable[None]],
        submitting_done: asyncio.Event,
        stop: asyncio.Event,
        *,
        manifest_run: int | None,
    ) -> None:
        """Take over dead workers (their items handed to ``resume``) until this worker's submitting is done and
        no other worker holds open work, or ``stop`` is set (a user's stop: this worker's own work ends as a
        lone run's does, and what others hold stays theirs). ``manifest_run``: the run whose marks say which
        items the manifest has (older than the joined one when a batch is run again with the same manifest)."""
        given_back = False
        while not stop.is_set():
            taken = await self.membership.take_over()
            if taken:
                self.taken_over += len(taken)
                log.warning("⇄ fleet: took over %d item(s) of worker(s) silent past their lease", len(taken))
                await resume(taken)
            elif submitting_done.is_set():
                if not given_back:
                    # Planned items this worker took but will not send (its lanes were stopped, or their sends
                    # failed too often) are everyone's again: another worker waits for the items it holds, and
                    # two workers each holding some would wait for each other forever.
                    await self.membership.give_back_planned()
                    given_back = True
                if not await self.membership.others_working(manifest_run):
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.heartbeat_s)

    async def leave(self) -> bool:
        """Give back the places and planned items this worker holds and write it out; True when it is the last
        of the batch's workers (it then writes the outputs).

        Another worker not yet ended holds no open work by now (:meth:`watch` waited for that): it is about to
        end, and then it is the last; or it died, and once its lease is past this worker takes it over and is the
        last itself. So the outputs are written once, by the last, whatever the order of deaths."""
        await self.writer.drain()
        if self.lost:
            raise LeaseLost(
                f"worker {self.worker_id} was taken over by another (silent past its {self.config.lease_s:g} s lease):"
                " its items are that worker's; nothing it held was lost"
            )
        if await self.membership.leave():
            return True
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            alive, silent = await self.membership.others_unended()
            if not alive and not silent:
                return False  # they ended after this one: the last of them writes the outputs
            if not alive:
                # Only one of the workers waiting here takes the dead over (under the batch's lock): it is the last.
                return await self.membership.outlast()
