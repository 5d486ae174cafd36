"""The PostgreSQL ledger's reads of single rows and totals: rows by id, the batch's runs, counts and its summary.

The first layer of :class:`wanbatch.ledger.postgres.PgLedger`: it holds the connection pool and the batch and
changes nothing. Each read is one statement on a pooled connection in autocommit mode. The streams of items and
images over these reads are the next layer's (:mod:`wanbatch.ledger.pgstreams`); the row builders and column
lists here are every layer's.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection
from dataclasses import fields
from typing import Any

from psycopg_pool import AsyncConnectionPool

from wanbatch.clock import Clock
from wanbatch.errors import LedgerError
from wanbatch.ledger.reads import END_OF_TIME_MS
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["IMAGE_COLUMNS", "ITEM_COLUMNS", "PgReads", "image_row", "item_row"]


_ITEM_FIELDS = tuple(f.name for f in fields(ItemRow))
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRow))
ITEM_COLUMNS = ", ".join(_ITEM_FIELDS)
IMAGE_COLUMNS = ", ".join(_IMAGE_FIELDS)


def item_row(values: tuple[Any, ...]) -> ItemRow:
    """An :class:`ItemRow` from the columns of ``ITEM_COLUMNS``, in order (jsonb arrives parsed)."""
    row = dict(zip(_ITEM_FIELDS, values, strict=False))
    row["state"] = ItemState(row["state"])
    row["request_ids"] = tuple(row["request_ids"])
    row["actual_prompts"] = tuple(row["actual_prompts"])
    row["more_sources"] = tuple(row["more_sources"])
    return ItemRow(**row)


def image_row(values: tuple[Any, ...]) -> ImageRow:
    """An :class:`ImageRow` from the columns of ``IMAGE_COLUMNS``, in order."""
    row = dict(zip(_IMAGE_FIELDS, values, strict=False))
    row["state"] = ImageState(row["state"])
    return ImageRow(**row)


class PgReads:
    """Reads of one batch of a PostgreSQL ledger, row by row and in totals; the layers above it stream and write."""

    def __init__(
        self, pool: AsyncConnectionPool, batch_id: int, path: str, clock: Clock, *, worker: str | None = None
    ) -> None:
        #: Where the ledger lives, for messages: the database (no password) and the batch's output location.
        self.path = path
        self._pool, self._batch, self._clock = pool, batch_id, clock
        #: The worker this ledger is opened for (wanbatch.fleet): it sees and moves only the open items it owns,
        #: and takes planned ones for itself. None: a reader (status, export) or a tool, which sees everything.
        self.worker = worker

    @property
    def pool(self) -> AsyncConnectionPool:
        """The connections, for the fleet's tables beside the ledger's (wanbatch.fleet)."""
        return self._pool

    @property
    def batch_id(self) -> int:
        return self._batch

    async def _all(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows of one statement on a free connection, with ``batch`` bound to this batch and ``me`` to its
        worker."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, {"batch": self._batch, "me": self.worker, **(params or {})})
            return await cur.fetchall()

    async def _one(self, sql: str, params: dict[str, Any] | None = None) -> tuple[Any, ...] | None:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    # ── one item ────────────────────────────────────────────────────────────────────────────────────

    async def get(self, item_id: str) -> ItemRow:
        row = await self._one(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE batch_id = %(batch)s AND item_id = %(id)s", {"id": item_id}
        )
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return item_row(row)

    async def get_many(self, item_ids: Collection[str]) -> list[ItemRow]:
        """The rows of ``item_ids``, in no set order, in one statement; :class:`LedgerError` names the first id
        that has none."""
        wanted = list(dict.fromkeys(item_ids))
        rows = await self._all(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE batch_id = %(batch)s AND item_id = ANY(%(ids)s)", {"ids": wanted}
        )
        found = [item_row(row) for row in rows]
        if len(found) < len(wanted):
            missing = sorted(set(wanted) - {row.item_id for row in found})
            raise LedgerError(f"no item {missing[0]} in {self.path}")
        return found

    async def state_of(self, item_id: str) -> ItemState:
        row = await self._one(
            "SELECT state FROM items WHERE batch_id = %(batch)s AND item_id = %(id)s", {"id": item_id}
        )
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemState(row[0])

    async def known_tasks(self, task_ids: Collection[str]) -> set[str]:
        rows = await self._all(
            "SELECT task_id FROM items WHERE batch_id = %(batch)s AND task_id = ANY(%(ids)s)",
            {"ids": list(dict.fromkeys(task_ids))},
        )
        return {task_id for (task_id,) in rows}

    async def times_unknown(self, item_id: str) -> int:
        row = await self._one(
            "SELECT count(*) FROM transitions WHERE batch_id = %(batch)s AND item_id = %(id)s AND to_state = 'unknown'",
            {"id": item_id},
        )
        return row[0]

    async def images_of(self, item_id: str) -> list[ImageRow]:
        rows = await self._all(
            f"SELECT {IMAGE_COLUMNS} FROM images WHERE batch_id = %(batch)s AND item_id = %(id)s ORDER BY image_index",
            {"id": item_id},
        )
        return [image_row(row) for row in rows]

    # ── the runs and their attempts ─────────────────────────────────────────────────────────────────

    async def stale_count(self, run: int) -> int:
        row = await self._one(
            "SELECT count(*) FROM items WHERE batch_id = %(batch)s AND last_seen_run < %(run)s", {"run": run}
        )
        return row[0]

    async def run_spans(self, at_ms: Collection[int]) -> dict[int, tuple[int, int]]:
        starts = [
            row[0]
            for row in await self._all("SELECT started_ms FROM runs WHERE batch_id = %(batch)s ORDER BY started_ms")
        ]
        spans = {}
        for at in at_ms:
            after = bisect.bisect_right(starts, at)
            spans[at] = (starts[after - 1] if after else 0, starts[after] if after < len(starts) else END_OF_TIME_MS)
        return spans

    async def recent_tasks(
        self,
        region: str,
        limit: int,
        *,
        since_ms: int = 0,
        until_ms: int = END_OF_TIME_MS,
        account: str | None = None,
    ) -> list[tuple[str, int]]:
        rows = await self._all(
            """SELECT items.task_id, items.submit_started_ms FROM transitions JOIN items USING (batch_id, item_id)
               WHERE transitions.batch_id = %(batch)s AND transitions.to_state = 'queued' AND items.region = %(region)s
                 AND items.task_id IS NOT NULL
                 AND items.submit_started_ms >= %(since)s AND items.submit_started_ms < %(until)s
                 AND (%(account)s::text IS NULL OR items.account = %(account)s::text)
               ORDER BY transitions.id DESC LIMIT %(limit)s""",
            {"region": region, "since": since_ms, "until": until_ms, "limit": limit * 4, "account": account},
        )
        return list(dict.fromkeys((task_id, started) for task_id, started in rows))[:limit]

    # ── counts ──────────────────────────────────────────────────────────────────────────────────────

    async def lanes(self, states: Collection[ItemState], *, run: int | None = None) -> set[tuple[str, str]]:
        seen = "" if run is None else " AND last_seen_run = %(run)s"
        rows = await self._all(
            f"SELECT DISTINCT region, model FROM items WHERE batch_id = %(batch)s AND state = ANY(%(states)s){seen}",
            {"states": [str(ItemState(s)) for s in states], "run": run},
        )
        return {(region, model) for region, model in rows}

    async def account_lanes(self, states: Collection[ItemState]) -> set[tuple[str, str, str]]:
        rows = await self._all(
            "SELECT DISTINCT region, account, model FROM items WHERE batch_id = %(batch)s AND state = ANY(%(states)s)",
            {"states": [str(ItemState(s)) for s in states]},
        )
        return {(region, account, model) for region, account, model in rows}

    async def account_summary(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        rows = await self._all(
            "SELECT account, state, count(*), SUM(images_generated), SUM(cost), currency FROM items"
            " WHERE batch_id = %(batch)s AND account != '' GROUP BY account, state, currency"
        )
        for account, state, count, generated, cost, currency in rows:
            entry = found.setdefault(account, {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}})
            entry["items"][state] = entry["items"].get(state, 0) + int(count)
            entry["images_generated"] += int(generated or 0)
            entry["cost"][currency] = round(entry["cost"].get(currency, 0.0) + float(cost or 0.0), 6)
        saved = await self._all(
            "SELECT items.account, count(*) FROM images JOIN items USING (batch_id, item_id)"
            " WHERE images.batch_id = %(batch)s AND images.state = 'saved' AND items.account != ''"
            " GROUP BY items.account"
        )
        for account, count in saved:
            found.setdefault(account, {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}})
            found[account]["images_saved"] = int(count)
        return found

    async def counts(self, *, run: int | None = None) -> dict[ItemState, int]:
        seen = "" if run is None else " AND last_seen_run = %(run)s"
        rows = await self._all(
            f"SELECT state, count(*) FROM items WHERE batch_id = %(batch)s{seen} GROUP BY state", {"run": run}
        )
        found = dict(rows)
        return {state: found.get(state, 0) for state in ItemState}

    async def meta(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM meta WHERE batch_id = %(batch)s AND key = %(key)s", {"key": key})
        return None if row is None else row[0]

    async def spent_cost(self) -> float:
        row = await self._one("SELECT COALESCE(SUM(cost), 0) FROM items WHERE batch_id = %(batch)s")
        return float(row[0])

    async def planned_images(self) -> int:
        row = await self._one("SELECT COALESCE(SUM(n_images), 0) FROM items WHERE batch_id = %(batch)s")
        return int(row[0])

    async def summary(self) -> dict[str, Any]:
        """Counts per item and image state, images billed, and cost per currency (spent, and planned at n each),
        read on one connection in one round trip (a pipeline)."""
        batch = {"batch": self._batch}
        async with self._pool.connection() as conn, conn.pipeline():
            items = await conn.execute(
                "SELECT state, count(*) FROM items WHERE batch_id = %(batch)s GROUP BY state", batch
            )
            images = await conn.execute(
                "SELECT state, count(*) FROM images WHERE batch_id = %(batch)s GROUP BY state", batch
            )
            money = await conn.execute(
                "SELECT currency, SUM(images_generated), SUM(cost), SUM(price_per_image * n_images)"
                " FROM items WHERE batch_id = %(batch)s GROUP BY currency",
                batch,
            )
            runs = await conn.execute("SELECT COALESCE(MAX(run), 0) FROM runs WHERE batch_id = %(batch)s", batch)
            per_item, per_image = dict(await items.fetchall()), dict(await images.fetchall())
            money_rows, (run_count,) = await money.fetchall(), await runs.fetchone()
        return {
            "items": {str(state): per_item.get(state, 0) for state in ItemState},
            "images": {str(state): per_image.get(state, 0) for state in ImageState},
            "images_generated": sum(int(row[1]) for row in money_rows),
            "cost": {row[0]: round(row[2], 6) for row in money_rows},
            "cost_planned": {row[0]: round(row[3], 6) for row in money_rows},
            "runs": run_count,
        }
