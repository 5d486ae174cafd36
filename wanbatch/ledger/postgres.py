"""The ledger in PostgreSQL, for batches that several processes (on several machines) may share.

The same contract as the SQLite ledger (:class:`~wanbatch.ledger.interface.RunLedger`), written with psycopg 3's async
connections from a small pool: each call takes a free connection for one statement or one transaction, so the
stages' calls overlap on the network instead of queueing behind one another. The tables and their versions are
:mod:`wanbatch.ledger.pgschema`'s; one database holds many batches, each named by its output location.

The class is built in layers like the SQLite one: :mod:`~wanbatch.ledger.pgreads` (rows and totals),
:mod:`~wanbatch.ledger.pgstreams` (streams, and a worker's taking of planned items),
:mod:`~wanbatch.ledger.pgmoves` (item transitions), :mod:`~wanbatch.ledger.pgimages` (image moves), and here
opening, runs, planning and meta values. Every commit is durable (``synchronous_commit`` on, the server's
default), so ``durable=True`` costs nothing more here.

The ledger is never given an API key and has no column that could hold one.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from wanbatch.clock import Clock
from wanbatch.errors import LedgerError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.moves import item_values
from wanbatch.ledger.pgimages import PgImageMoves
from wanbatch.ledger.pgschema import batch_key, prepare
from wanbatch.ledger.records import AddResult, ItemLike
from wanbatch.ledger.sqlite import MORE_SOURCES_KEPT

__all__ = ["POOL_SIZE", "PgLedger", "address", "connect"]

#: Connections a ledger keeps: the stages that write at once (submit, track, download, reconcile) and a reader.
POOL_SIZE = 4
CONNECT_TIMEOUT_S = 10
#: Planning commits this many items at a time, under the batch's lock (the manifest positions are given out
#: in order there); a part of a plan lost to a crash costs nothing, the next run plans it again.
ROWS_PER_COMMIT = 50_000

# Items met again stay as they are, only marked seen in this run (the SQLite ledger's rule). A part of a plan
# is one statement over arrays, one per column (``unnest``): a row per item would be a statement per item. The
# arrays go in binary (``%b``): as text each string is escaped in Python, which took most of planning's time.
_UPSERT_ITEMS = f"""INSERT INTO items (batch_id, seq, item_id, replica, region, model, n_images, request, source,
        entry, variables, output, price_per_image, currency, planned_ms, updated_ms, first_seen_run, last_seen_run,
        state)
    SELECT %s, u.seq, u.item_id, u.replica, u.region, u.model, u.n_images, u.request::jsonb, u.source, u.entry,
        u.variables::jsonb, u.output, u.price, u.currency, %s, %s, %s, %s, 'planned'
    FROM unnest(%b::bigint[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::integer[], %b::text[],
        %b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], %b::text[])
        AS u(seq, item_id, replica, region, model, n_images, request, source, entry, variables, output, price, currency)
    ON CONFLICT (batch_id, item_id) DO UPDATE SET
        more_sources = CASE
            WHEN items.last_seen_run < excluded.last_seen_run THEN '[]'::jsonb
            WHEN items.source = excluded.source OR jsonb_array_length(items.more_sources) >= {MORE_SOURCES_KEPT}
                THEN items.more_sources
            ELSE items.more_sources || jsonb_build_array(excluded.source) END,
        source = CASE WHEN items.last_seen_run < excluded.last_seen_run THEN excluded.source ELSE items.source END,
        entry = CASE WHEN items.last_seen_run < excluded.last_seen_run THEN excluded.entry ELSE items.entry END,
        last_seen_run = excluded.last_seen_run"""
_SEQ, _ID = 0, 1  #: where the manifest position and the item id are in an item's values (``_item_values``)
_LOCK_BATCH = "SELECT batch_id FROM batches WHERE batch_id = %(batch)s FOR UPDATE"


def address(url: str) -> str:
    """The database of ``url`` for messages: host, port, database, user and schema option, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise LedgerError(f"not a PostgreSQL address: {exc}") from None
    where = f"postgresql://{parts.get('user', '')}{'@' if parts.get('user') else ''}{parts.get('host', '')}"
    where += f":{parts['port']}" if parts.get("port") else ""
    where += f"/{parts.get('dbname', '')}"
    return where + (f" ({parts['options']})" if parts.get("options") else "")


async def connect(url: str) -> psycopg.AsyncConnection:
    """One connection in autocommit mode; an unreachable database is a :class:`LedgerError` naming it."""
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise LedgerError(f"cannot reach the ledger database {address(url)}: {str(exc).strip()}") from None


class PgLedger(PgImageMoves, RunLedger):
    """One batch of a PostgreSQL ledger. Open with :meth:`open`; use as an async context manager."""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        batch: str | Path,
        clock: Clock,
        create: bool = True,
        pool_size: int = POOL_SIZE,
        worker: str | None = None,
    ) -> PgLedger:
        """Open the batch named by its output location ``batch`` in the database at ``url`` (a libpq URL or
        conninfo). With ``create``, the tables are made at first use and the batch added; without it, a missing
        batch is a :class:`LedgerError`. Tables of another version are refused (see ``pgschema``). ``worker``: the
        name of the worker it is opened for (see :mod:`wanbatch.fleet.members`), None for a reader."""
        key = batch_key(batch)
        async with await connect(url) as conn:
            await prepare(conn, address(url), create=create)
            if create:
                cur = await conn.execute(
                    "INSERT INTO batches (out, created_ms) VALUES (%s, %s)"
                    " ON CONFLICT (out) DO UPDATE SET out = excluded.out RETURNING batch_id",
                    (key, clock.now_ms()),
                )
            else:
                cur = await conn.execute("SELECT batch_id FROM batches WHERE out = %s", (key,))
            found = await cur.fetchone()
        if found is None:
            raise LedgerError(f"no batch {key} in the ledger {address(url)}: is this the --out of a run?")
        pool = AsyncConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, open=False, name="wanbatch-ledger"
        )
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        return cls(pool, found[0], f"{address(url)} batch {key}", clock, worker=worker)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PgLedger:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ── runs and items ──────────────────────────────────────────────────────────────────────────────

    async def begin_run(self) -> int:
        """Record a new run of the batch and return its number (1, 2, ...); runs of several processes started
        at once are numbered one after the other (the batch's row is locked while one is numbered)."""
        params = {"batch": self._batch, "now": self._clock.now_ms(), "pid": os.getpid(), "host": socket.gethostname()}
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            await conn.execute(_LOCK_BATCH, params)
            cur = await conn.execute(
                "INSERT INTO runs (batch_id, run, started_ms, pid, host) SELECT %(batch)s, COALESCE(MAX(run), 0) + 1,"
                " %(now)s, %(pid)s, %(host)s FROM runs WHERE batch_id = %(batch)s RETURNING run",
                params,
            )
            (run,) = await cur.fetchone()
        return run

    async def add_items(
        self,
        items: Iterable[ItemLike],
        *,
        run: int,
        price_of: Callable[[ItemLike], float] | None = None,
        currency: str = "CNY",
        batch_size: int = 5000,
    ) -> AddResult:
        """Plan the items not yet in the batch and mark every item given as seen in ``run``, reading ``items``
        ``batch_size`` at a time; an item already there keeps its state (only its source and entry follow).

        Each commit locks the batch's row, reads which of its ids the batch holds, gives the new ones the next
        manifest positions and sends them as one statement (a second for an id met twice in one part)."""
        source = iter(items)
        added = existing = 0
        more = True
        while more:
            taken = new = 0
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_LOCK_BATCH, {"batch": self._batch})
                cur = await conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items WHERE batch_id = %s", (self._batch,))
                (last,) = await cur.fetchone()
                while taken < ROWS_PER_COMMIT:
                    # Each item is converted as it is read and dropped: the ledger never holds the manifest's items.
                    rows = [_item_values(item, price_of, currency) for item in islice(source, batch_size)]
                    if not rows:
                        more = False
                        break
                    placed = await self._place_new(conn, rows, last)
                    now = self._clock.now_ms()
                    scalars = (self._batch, now, now, run, run)
                    for part in _rounds(rows):
                        await conn.execute(
                            _UPSERT_ITEMS, (*scalars, *(list(column) for column in zip(*part, strict=True)))
                        )
                    taken, new, last = taken + len(rows), new + placed, last + placed
            added, existing = added + new, existing + taken - new
        return AddResult(added=added, existing=existing)

    async def _place_new(self, conn: psycopg.AsyncConnection, rows: list[list[Any]], last: int) -> int:
        """Give the rows of items new to the batch (their first row here) the manifest positions after ``last``
        (the rows of held items keep 0, which their update ignores); returns how many were new."""
        ids = list(dict.fromkeys(row[_ID] for row in rows))
        cur = await conn.execute(
            "SELECT item_id FROM items WHERE batch_id = %s AND item_id = ANY(%s)", (self._batch, ids)
        )
        held = {item_id for (item_id,) in await cur.fetchall()}
        placed = 0
        for row in rows:
            if row[_ID] not in held:
                held.add(row[_ID])
                placed += 1
                row[_SEQ] = last + placed
        return placed

    async def set_meta(self, key: str, value: str) -> None:
        await self._all(
            "INSERT INTO meta (batch_id, key, value) VALUES (%(batch)s, %(key)s, %(value)s)"
            " ON CONFLICT (batch_id, key) DO UPDATE SET value = excluded.value RETURNING key",
            {"key": key, "value": value},
        )

    async def delete_meta(self, key: str) -> None:
        await self._all("DELETE FROM meta WHERE batch_id = %(batch)s AND key = %(key)s RETURNING key", {"key": key})


def _rounds(rows: list[list[Any]]) -> list[list[list[Any]]]:
    """``rows`` in parts that each hold an item id once (one statement cannot upsert a row twice): the first
    place of each id, then the second, ...; in order within each, so an item's places are met in order."""
    met: Counter[str] = Counter()
    rounds: list[list[list[Any]]] = []
    for row in rows:
        number = met[row[_ID]]
        met[row[_ID]] += 1
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(row)
    return rounds


def _item_values(item: ItemLike, price_of: Callable[[ItemLike], float] | None, currency: str) -> list[Any]:
    """An item's values, in the order of ``_UPSERT_ITEMS``'s arrays. The manifest position (``_SEQ``) is 0 until
    :meth:`PgLedger._place_new` gives one: NOT NULL is checked before ON CONFLICT is, and an item the batch holds
    keeps its own."""
    return [0, *item_values(item, price_of, currency)]
