"""The workers of one batch in a PostgreSQL ledger: who is alive, which run they share, and the items of the dead.

Every process that runs a batch through a database ledger is a worker: it is written into ``workers`` when it
starts and beats there (its ``heartbeat_ms``, on the **database's** clock, so that hosts whose clocks differ
agree on who is late). A worker not heard from for ``lease_s`` is dead: a live worker takes over every item it
held in an open state (``submitting``, ``unknown``, ``queued``, ``generated``) by making itself their owner, and
lets go of the planned items it had taken, in one transaction. It then treats them exactly as a resume treats
the items a killed process left (see :mod:`wanbatch.engine`): a create under way is reconciled through the
account's task list, never sent again on faith.

A worker that is taken over is *fenced*: every move it makes of an item names it as the owner
(:mod:`wanbatch.ledger.pgmoves`), so a worker that was only cut off, and comes back, finds its writes refused
(:class:`~wanbatch.errors.LeaseLost`) and stops; its heartbeat, refused too, tells it the same.

All workers of a batch started while one of them is alive share that one's run, so that "seen in this run"
(which items the manifest has) means the same for all of them. The last worker to finish writes the outputs
(:meth:`Membership.leave` says whether it is the last, under the batch's lock).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from wanbatch.clock import Clock
from wanbatch.fleet.config import FleetConfig
from wanbatch.ledger.pgmoves import OPEN_LIST
from wanbatch.ledger.pgreads import ITEM_COLUMNS, item_row
from wanbatch.ledger.records import ItemRow

__all__ = ["DB_NOW_MS", "FleetConfig", "Membership", "WorkerRow", "alive_sql", "new_worker_id"]

#: The database's clock in ms since the epoch: the one clock every host of a fleet reads alike.
DB_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

log = logging.getLogger("wanbatch")

_LOCK_BATCH = "SELECT batch_id FROM batches WHERE batch_id = %(batch)s FOR UPDATE"
_GIVE_BACK = "UPDATE items SET owner = NULL WHERE batch_id = %(batch)s AND owner = %(me)s AND state = 'planned'"


def alive_sql(table: str = "") -> str:
    """The condition of a worker at work: not ended, not taken over, heard from within its own lease (each worker
    writes the lease it was given, so that every reader judges it alike)."""
    prefix = f"{table}." if table else ""
    alive = f"{prefix}heartbeat_ms >= {DB_NOW_MS} - {prefix}lease_ms"
    return f"{prefix}ended_ms IS NULL AND {prefix}taken_by IS NULL AND {alive}"


_ALIVE = alive_sql()


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker as ``wanbatch status`` shows it."""

    worker_id: str
    host: str
    pid: int
    run: int | None
    started_ms: int  #: our clock's
    heartbeat_age_s: float  #: since its last heartbeat, on the database's clock
    alive: bool
    ended: bool
    taken_by: str | None
    items_held: int  #: its items in an open state


def new_worker_id() -> str:
    """A worker's name: host, pid and a random part (a pid is reused; a host name may be shared)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Membership:
    """This process's place among the workers of one batch."""

    def __init__(
        self, pool: AsyncConnectionPool, batch_id: int, *, worker_id: str, clock: Clock, config: FleetConfig
    ) -> None:
        self._pool, self._batch, self.worker_id = pool, batch_id, worker_id
        self._clock, self.config = clock, config

    def _params(self, **more: Any) -> dict[str, Any]:
        return {"batch": self._batch, "me": self.worker_id, "lease_ms": int(self.config.lease_s * 1000), **more}

    async def join(self) -> int:
        """Write this worker in, and return the run it works in: that of the live workers if there are any
        (they share one), else a new run of the batch."""
        params = self._params(now=self._clock.now_ms(), host=socket.gethostname(), pid=os.getpid())
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_LOCK_BATCH, params)
            cur = await conn.execute(f"SELECT max(run) FROM workers WHERE batch_id = %(batch)s AND {_ALIVE}", params)
            (run,) = await cur.fetchone()
            if run is None:
                cur = await conn.execute(
                    "INSERT INTO runs (batch_id, run, started_ms, pid, host) SELECT %(batch)s,"
                    " COALESCE(max(run), 0) + 1, %(now)s, %(pid)s, %(host)s FROM runs WHERE batch_id = %(batch)s"
                    " RETURNING run",
                    params,
                )
                (run,) = await cur.fetchone()
            await conn.execute(
                "INSERT INTO workers (batch_id, worker_id, host, pid, started_ms, heartbeat_ms, lease_ms, run)"
                f" VALUES (%(batch)s, %(me)s, %(host)s, %(pid)s, %(now)s, {DB_NOW_MS}, %(lease_ms)s, %(run)s)",
                {**params, "run": run},
            )
        return run

    async def beat(self) -> bool:
        """Say this worker is alive; False when it is not any more: another worker took it over (it was
        silent too long), and every item it held is that one's."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"UPDATE workers SET heartbeat_ms = {DB_NOW_MS}"
                " WHERE batch_id = %(batch)s AND worker_id = %(me)s AND taken_by IS NULL"
                " RETURNING worker_id",
                self._params(),
            )
            return await cur.fetchone() is not None

    async def take_over(self) -> list[ItemRow]:
        """Take over the workers found dead, and the open items of workers that ended with some (stopped by the
        user with downloads pending): those items become this worker's (returned, to be resumed); the planned
        items they had taken go back to everyone; the places of their open tasks on the accounts pass to this
        worker (whose resumed claims hold them) and their other places are given up. One transaction; a dead
        worker another live one is taking over at the same moment is skipped (``SKIP LOCKED``), and an item is
        moved to one taker only (its row's lock)."""
        async with self._pool.connection() as conn, conn.transaction():
            _, rows = await self._take_over_in(conn, ended_too=True)
        return rows

    async def _take_over_in(self, conn: Any, *, ended_too: bool) -> tuple[list[str], list[ItemRow]]:
        """:meth:`take_over` in the caller's transaction (``ended_too``: the open items of ended workers as well):
        the workers found dead and taken over, and the items taken."""
        params = self._params(open=OPEN_LIST)
        cur = await conn.execute(
            "SELECT worker_id FROM workers WHERE batch_id = %(batch)s AND worker_id <> %(me)s"
            f" AND ended_ms IS NULL AND taken_by IS NULL AND heartbeat_ms < {DB_NOW_MS} - lease_ms"
            " FOR UPDATE SKIP LOCKED",
            params,
        )
        dead = [worker for (worker,) in await cur.fetchall()]
        if dead:
            await conn.execute(
                "UPDATE workers SET taken_by = %(me)s WHERE batch_id = %(batch)s AND worker_id = ANY(%(dead)s)",
                {**params, "dead": dead},
            )
        ended: list[str] = []
        if ended_too:
            cur = await conn.execute(
                "SELECT DISTINCT owner FROM items WHERE batch_id = %(batch)s AND state = ANY(%(open)s) AND owner IN"
                " (SELECT worker_id FROM workers WHERE batch_id = %(batch)s AND ended_ms IS NOT NULL)",
                params,
            )
            ended = [owner for (owner,) in await cur.fetchall()]
        gone = [*dead, *ended]
        if not gone:
            return [], []
        params["gone"] = gone
        await conn.execute(
            "UPDATE items SET owner = NULL WHERE batch_id = %(batch)s AND owner = ANY(%(gone)s) AND state = 'planned'",
            params,
        )
        # The places of their open tasks pass to the taker (those tasks still occupy the service: were they
        # freed, another claim could take one before the taker's resumed claims hold them again); the rest
        # (claims of items never sent) are given up.
        await conn.execute(
            "UPDATE places SET worker_id = %(me)s WHERE batch_id = %(batch)s AND worker_id = ANY(%(gone)s)"
            " AND item_id IN (SELECT item_id FROM items WHERE batch_id = %(batch)s AND owner = ANY(%(gone)s)"
            # A sync call's answer lost with its worker is written off by the taker, which opens no claim for it.
            " AND state IN ('submitting', 'unknown', 'queued') AND endpoint IS DISTINCT FROM 'sync')",
            params,
        )
        await conn.execute("DELETE FROM places WHERE batch_id = %(batch)s AND worker_id = ANY(%(gone)s)", params)
        cur = await conn.execute(
            f"UPDATE items SET owner = %(me)s WHERE batch_id = %(batch)s AND owner = ANY(%(gone)s)"
            f" AND state = ANY(%(open)s) RETURNING {ITEM_COLUMNS}",
            params,
        )
        return dead, [item_row(row) for row in await cur.fetchall()]

    async def others_unended(self) -> tuple[int, int]:
        """The other workers of the batch that have not ended nor been taken over: (heard from within their
        lease, silent past it)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT count(*) FILTER (WHERE heartbeat_ms >= {DB_NOW_MS} - lease_ms), count(*) FROM workers"
                " WHERE batch_id = %(batch)s AND worker_id <> %(me)s AND ended_ms IS NULL AND taken_by IS NULL",
                self._params(),
            )
            alive, unended = await cur.fetchone()
        return alive, unended - alive

    async def others_working(self, run: int | None) -> bool:
        """Whether another worker (alive, or dead and not yet taken over) holds work of the batch: open items, or
        planned items of ``run`` it has taken. Planned items nobody holds are not waited for: a worker whose
        submitting has ended left them (its lanes stopped, or their sends failed too often), as a lone run does."""
        params = self._params(run=run, open=[*OPEN_LIST, "planned"])
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM items WHERE batch_id = %(batch)s AND state = ANY(%(open)s)"
                " AND owner IS NOT NULL AND owner <> %(me)s AND (state <> 'planned' OR last_seen_run = %(run)s))",
                params,
            )
            (busy,) = await cur.fetchone()
            return bool(busy)

    async def give_back_planned(self) -> None:
        """Let go of the planned items this worker took: any worker may take them now."""
        async with self._pool.connection() as conn:
            await conn.execute(_GIVE_BACK, self._params())

    async def leave(self) -> bool:
        """Write this worker out (its planned items go back to everyone); True when no other worker of the batch
        is still at work: this one is the last, and writes the outputs. A worker found dead is taken over here,
        under the batch's lock, so that a worker that left before, and waits for the others to end
        (:meth:`outlast`), does not count it as gone too and write the outputs as well."""
        params = self._params()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_LOCK_BATCH, params)
            await conn.execute(_GIVE_BACK, params)
            # Every claim of its stages has ended: a place still held is one whose give-back write was lost.
            await conn.execute("DELETE FROM places WHERE batch_id = %(batch)s AND worker_id = %(me)s", params)
            await conn.execute(
                f"UPDATE workers SET ended_ms = {DB_NOW_MS} WHERE batch_id = %(batch)s AND worker_id = %(me)s", params
            )
            _, last = await self._outlive(conn, params)
        return last

    async def outlast(self) -> bool:
        """For a worker that left while others were at work, and finds none alive now but some silent past their
        lease: take those over, under the batch's lock; True when this worker took one and no other is alive (it
        is then the last, and writes the outputs), False when another leaving worker took them first."""
        params = self._params()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_LOCK_BATCH, params)
            dead, last = await self._outlive(conn, params)
        return bool(dead) and last

    async def _outlive(self, conn: Any, params: dict[str, Any]) -> tuple[list[str], bool]:
        """For a worker that has ended its stages, under the batch's lock: take over the workers found dead, and
        say whether no other is alive now (the workers taken over, and that)."""
        dead, taken = await self._take_over_in(conn, ended_too=False)
        if taken:  # pragma: no cover - a worker's stages wait until no other holds open work (watch)
            log.error("! fleet: %d item(s) of a dead worker were found after this one's stages ended", len(taken))
        cur = await conn.execute(f"SELECT count(*) FROM workers WHERE batch_id = %(batch)s AND {_ALIVE}", params)
        (others,) = await cur.fetchone()
        return dead, others == 0


async def workers_of(pool: AsyncConnectionPool, batch_id: int) -> list[WorkerRow]:
    """Every worker the batch has had, newest first, with the items each holds (alive: by its own lease)."""
    params = {"batch": batch_id, "open": OPEN_LIST}
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"""SELECT w.worker_id, w.host, w.pid, w.run, w.started_ms,
                    ({DB_NOW_MS} - w.heartbeat_ms) / 1000.0, ({alive_sql("w")}),
                    w.ended_ms IS NOT NULL, w.taken_by,
                    (SELECT count(*) FROM items i WHERE i.batch_id = w.batch_id AND i.owner = w.worker_id
                        AND i.state = ANY(%(open)s))
                FROM workers w WHERE w.batch_id = %(batch)s ORDER BY w.started_ms DESC, w.worker_id""",
            params,
        )
        return [
            WorkerRow(worker, host, pid, run, started, float(age), alive, ended, taken, held)
            for worker, host, pid, run, started, age, alive, ended, taken, held in await cur.fetchall()
        ]
