"""An account's quota shared through the database by every worker that submits on it.

The service's quotas are per account and model, whatever process sends: two workers pacing alone would send
twice the rate, and each keeping its own count of open tasks would hold twice the tasks. So a worker of a
database ledger paces and counts through two tables:

- ``lanes`` (one row per account and model): ``next_ms``, the database-clock time of the next free send slot.
  A worker takes the next slot in one statement (``next_ms`` moved on by one interval) and waits until it
  comes, so that the creates of all workers are spaced evenly, with no burst where two workers meet.
- ``places`` (one row per item whose claim holds a place): a worker takes a place only while fewer than the
  lane's capacity are held, under the lane row's lock, and, with a budget, only while what the batch has
  spent plus what every worker has reserved leaves room for the item's full price. A place is given back when
  its claim ends. The places of a worker that died stay held until another takes its items over (its tasks
  still occupy the service until then): those of its open tasks pass to the taker then, whose resumed claims
  hold them, and the rest are freed. Another batch's places count only while their worker is alive (a batch
  whose last worker was killed has no one to take it over).

Giving a place back is a write the claim's sync ending cannot await: such writes go, in order, through one
writer task (:class:`PlaceWriter`), which the engine drains before the batch ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from psycopg_pool import AsyncConnectionPool

from wanbatch.clock import Clock
from wanbatch.fleet.members import DB_NOW_MS, alive_sql
from wanbatch.ledger.records import ItemRow
from wanbatch.service.pacing import Pacer
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claim, Claims, Refusal, full_price

__all__ = ["PlaceWriter", "SharedClaims", "SharedPacer", "lane_name"]

log = logging.getLogger("wanbatch")

#: How long a worker waits before asking again for a place that every worker's claims hold (wall seconds).
PLACE_POLL_S = 0.05
_MAKE_LANE = "INSERT INTO lanes (lane, model, next_ms) VALUES (%(lane)s, %(model)s, 0) ON CONFLICT DO NOTHING"


def lane_name(account: str, region: str) -> str:
    """The name a lane's quota is shared under: its account's, or for the environment's key, its region's."""
    return account or f"region:{region}"


class SharedPacer(Pacer):
    """A lane's pacing through the database: each create takes the account's next slot, whoever sends it."""

    def __init__(self, rate_per_s: float, *, clock: Clock, pool: AsyncConnectionPool, lane: str, model: str) -> None:
        super().__init__(rate_per_s, clock=clock)
        self._pool, self._key = pool, {"lane": lane, "model": model}
        self._made = False  #: whether the lane's row is known to be in the table

    async def wait(self) -> None:
        """Return when this worker's slot of the account's pace comes (taken in the database)."""
        async with self._turn:
            interval_s = self.interval_s
            if self.factor < 1.0:  # slowed down after a 429: the shared spacing stretches for every worker
                interval_s += self._clock.to_wall_s(1.0 / self.rate_per_s - 1.0 / (self.quota_per_s * self._margin))
            params = {**self._key, "interval_ms": max(1, round(interval_s * 1000))}
            async with self._pool.connection() as conn:
                if not self._made:
                    await conn.execute(_MAKE_LANE, params)
                    self._made = True
                cur = await conn.execute(
                    f"""WITH now AS (SELECT {DB_NOW_MS} AS ms)
                    UPDATE lanes SET next_ms = GREATEST(lanes.next_ms, now.ms) + %(interval_ms)s FROM now
                    WHERE lanes.lane = %(lane)s AND lanes.model = %(model)s
                    RETURNING GREATEST(lanes.next_ms - %(interval_ms)s - now.ms, 0)""",
                    params,
                )
                (wait_ms,) = await cur.fetchone()
            await asyncio.sleep(wait_ms / 1000)


class PlaceWriter:
    """Writes to ``places`` that no one awaits (a place given back, a resumed claim's place), in order."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def write(self, sql: str, params: dict[str, Any]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        self._queue.put_nowait((sql, params))

    async def _run(self) -> None:
        while (job := await self._queue.get()) is not None:
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(*job)
            except Exception as exc:  # a lost write keeps a place held: it is freed when the worker is taken over
                log.warning("! fleet: a place on the account was not updated: %s", exc)

    async def drain(self) -> None:
        """Wait until every write asked for so far is made."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None


class SharedClaims(Claims):
    """A lane's claims whose places, and the budget's reservations, are held in the database for all workers."""

    def __init__(
        self,
        capacity: int,
        budget: Budget,
        *,
        freed: asyncio.Event | None = None,
        pool: AsyncConnectionPool,
        writer: PlaceWriter,
        batch_id: int,
        worker_id: str,
        lane: str,
        model: str,
    ) -> None:
        super().__init__(capacity, budget, freed=freed)
        self._pool, self._writer = pool, writer
        self._key = {"batch": batch_id, "me": worker_id, "lane": lane, "model": model}

    async def open(self, row: ItemRow, stop: asyncio.Event) -> Claim | Refusal:
        """A place among this worker's (``Claims.open``), then one among every worker's on the account."""
        claim = await super().open(row, stop)
        if isinstance(claim, Refusal):
            return claim
        while True:
            taken = await self._take_place(row.item_id, claim.price)
            if taken is True:
                return claim
            if taken is Refusal.budget or stop.is_set():
                claim.release()
                return Refusal.budget if taken is Refusal.budget else Refusal.stopped
            await asyncio.sleep(PLACE_POLL_S)

    async def _take_place(self, item_id: str, price: float) -> bool | Refusal:
        """Take a place if the lane has one free and the budget room (one transaction under the lane's lock);
        False to ask again, or :attr:`Refusal.budget`."""
        params = {**self._key, "id": item_id, "price": price, "limit": self.budget.limit}
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_MAKE_LANE, params)
            await conn.execute("SELECT 1 FROM lanes WHERE lane = %(lane)s AND model = %(model)s FOR UPDATE", params)
            # Another batch's places count while their worker is alive: one killed and never followed by another
            # worker of its batch is never taken over, and would hold the account's places for good.
            cur = await conn.execute(
                "SELECT count(*) FROM places p LEFT JOIN workers w USING (batch_id, worker_id)"
                " WHERE p.lane = %(lane)s AND p.model = %(model)s AND (p.batch_id = %(batch)s OR w.worker_id IS NULL"
                f" OR ({alive_sql('w')}))",
                params,
            )
            (held,) = await cur.fetchone()
            if held >= self.capacity:
                return False
            if self.budget.limit is not None:
                # Every lane of the batch reserves under its own lock: the batch's row serialises the budget.
                await conn.execute("SELECT 1 FROM batches WHERE batch_id = %(batch)s FOR UPDATE", params)
                cur = await conn.execute(
                    "SELECT (SELECT COALESCE(sum(cost), 0) FROM items WHERE batch_id = %(batch)s)"
                    " + (SELECT COALESCE(sum(price), 0) FROM places WHERE batch_id = %(batch)s)",
                    params,
                )
                (committed,) = await cur.fetchone()
                if committed + price > self.budget.limit + 1e-9:
                    self.budget.exhausted = True
                    return Refusal.budget
            await conn.execute(
                "INSERT INTO places (batch_id, item_id, lane, model, worker_id, price)"
                " VALUES (%(batch)s, %(id)s, %(lane)s, %(model)s, %(me)s, %(price)s)"
                " ON CONFLICT (batch_id, item_id) DO UPDATE SET worker_id = excluded.worker_id",
                params,
            )
        return True

    def resume(self, row: ItemRow) -> Claim:
        """A claim for an item whose task is open already (a resume, a takeover): its place is held whatever
        the count says, since the task holds one on the service."""
        claim = super().resume(row)
        self._writer.write(
            "INSERT INTO places (batch_id, item_id, lane, model, worker_id, price)"
            " VALUES (%(batch)s, %(id)s, %(lane)s, %(model)s, %(me)s, %(price)s)"
            " ON CONFLICT (batch_id, item_id) DO UPDATE SET worker_id = excluded.worker_id",
            {**self._key, "id": row.item_id, "price": full_price(row)},
        )
        return claim

    def _end(self, claim: Claim, billed: float) -> None:
        super()._end(claim, billed)
        self._writer.write(
            "DELETE FROM places WHERE batch_id = %(batch)s AND item_id = %(id)s AND worker_id = %(me)s",
            {**self._key, "id": claim.item_id},
        )
