"""The PostgreSQL ledger's queries: rows by id, streams of items and images, counts and the batch's history.

The first layer of :class:`wanbatch.ledger.postgres.PgLedger`: it holds the connection pool and the batch and
changes nothing. Each read is one statement on a pooled connection in autocommit mode. Streams read in keyset
pages (one statement a page, on whichever connection is free), so no transaction stays open while the caller
works, and a row moved while iterating is not repeated.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import fields
from typing import Any

from psycopg_pool import AsyncConnectionPool

from wanbatch.clock import Clock
from wanbatch.errors import LedgerError
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["IMAGE_COLUMNS", "ITEM_COLUMNS", "OPEN_STATES", "PAGE_SIZE", "PgReads", "image_row", "item_row"]

#: Rows fetched per query by the streaming iterators.
PAGE_SIZE = 1000
_NO_DEADLINE_MS = 2**62  #: sorts an image without a deadline after every real one
_END_OF_TIME_MS = 2**62
_DONE = object()  #: the end of a stream, for ``anext``
#: The states of an item that has (or may have) a task, or images to save: one worker's at a time.
OPEN_STATES = frozenset({ItemState.submitting, ItemState.unknown, ItemState.queued, ItemState.generated})
_ORDERABLE = frozenset({"seq", "submit_started_ms", "submitted_ms", "updated_ms"})

_ITEM_FIELDS = tuple(f.name for f in fields(ItemRow))
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRow))
ITEM_COLUMNS = ", ".join(_ITEM_FIELDS)
IMAGE_COLUMNS = ", ".join(_IMAGE_FIELDS)
_ITEM_COLUMNS_OF_JOIN = ", ".join(f"items.{name}" for name in _ITEM_FIELDS)
_IMAGE_COLUMNS_OF_JOIN = ", ".join(f"images.{name}" for name in _IMAGE_FIELDS)


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


async def merged(streams: list[AsyncIterator[Any]], key: Callable[[Any], Any]) -> AsyncIterator[Any]:
    """The rows of sorted ``streams`` in one sorted stream (``heapq.merge`` for async iterators)."""
    heap = []
    for number, stream in enumerate(streams):
        if (first := await anext(stream, _DONE)) is not _DONE:
            heap.append((key(first), number, first))
    heapq.heapify(heap)
    while heap:
        _, number, row = heap[0]
        yield row
        if (following := await anext(streams[number], _DONE)) is _DONE:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (key(following), number, following))


class PgReads:
    """Reads of one batch of a PostgreSQL ledger; the layers above it write."""

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
            spans[at] = (starts[after - 1] if after else 0, starts[after] if after < len(starts) else _END_OF_TIME_MS)
        return spans

    async def recent_tasks(
        self,
        region: str,
        limit: int,
        *,
        since_ms: int = 0,
        until_ms: int = _END_OF_TIME_MS,
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

    # ── streams ─────────────────────────────────────────────────────────────────────────────────────

    async def iter_items(
        self,
        states: Collection[ItemState],
        *,
        run: int | None = None,
        region: str | None = None,
        model: str | None = None,
        after_seq: int = 0,
        order_by: str = "seq",
        limit: int | None = None,
    ) -> AsyncIterator[ItemRow]:
        """Items in ``states``, streamed in pages, ordered by ``order_by`` (``seq``, or a time column then seq);
        optionally only those seen in ``run``, of one ``region`` and ``model``, after ``after_seq``.

        One stream per state (each read from the (batch, state, seq) index in order), merged here."""
        if order_by not in _ORDERABLE:
            raise LedgerError(f"cannot order items by {order_by!r}; choose one of {', '.join(sorted(_ORDERABLE))}")
        where = "".join(
            f" AND {column} = %({column})s"
            for column, value in (("last_seen_run", run), ("region", region), ("model", model))
            if value is not None
        )
        params = {"last_seen_run": run, "region": region, "model": model, "after_seq": after_seq}
        page_size = min(PAGE_SIZE, limit) if limit else PAGE_SIZE
        # A worker's open items are its own: another's are that one's to follow (or to take over, if it died).
        streams = [
            self._iter_state(ItemState(s), where + self._owned(ItemState(s)), params, order_by, page_size)
            for s in set(states)
        ]
        given = 0
        async for row in merged(streams, key=lambda r: (getattr(r, order_by) or 0, r.seq)):
            if limit is not None and given >= limit:
                return
            given += 1
            yield row

    def _owned(self, state: ItemState) -> str:
        """The condition that keeps a worker's reads of ``state`` to its own items (none for a reader)."""
        return " AND owner = %(me)s" if self.worker is not None and state in OPEN_STATES else ""

    async def take_planned(
        self, *, run: int | None, region: str, model: str, after_seq: int, limit: int
    ) -> list[ItemRow]:
        """Up to ``limit`` planned items of ``region`` and ``model`` (seen in ``run``) after ``after_seq``, in
        manifest order, that no other worker has taken; a worker takes them for itself in the same statement
        (``FOR UPDATE SKIP LOCKED``: rows another worker is taking at that moment are passed over, not waited
        for). Taking is not sending: the move to submitting is still the compare-and-set that sends once."""
        seen = "" if run is None else " AND last_seen_run = %(run)s"
        params = {"run": run, "region": region, "model": model, "after_seq": after_seq}
        if self.worker is None:
            rows = await self._all(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE batch_id = %(batch)s AND state = 'planned'{seen}"
                f" AND region = %(region)s AND model = %(model)s AND seq > %(after_seq)s ORDER BY seq LIMIT {limit}",
                params,
            )
        else:
            rows = await self._all(
                # The rows are picked in a CTE, which runs once: a subquery in the WHERE may run again for each
                # row the UPDATE meets, and each run would skip other rows.
                f"""WITH picked AS (
                        SELECT item_id FROM items WHERE batch_id = %(batch)s AND state = 'planned'{seen}
                        AND region = %(region)s AND model = %(model)s AND seq > %(after_seq)s
                        AND (owner IS NULL OR owner = %(me)s) ORDER BY seq LIMIT {limit} FOR UPDATE SKIP LOCKED)
                    UPDATE items SET owner = %(me)s FROM picked
                    WHERE items.batch_id = %(batch)s AND items.item_id = picked.item_id
                    RETURNING {_ITEM_COLUMNS_OF_JOIN}""",
                params,
            )
        return sorted((item_row(values) for values in rows), key=lambda row: row.seq)

    async def held_elsewhere(self, *, run: int | None, region: str, model: str) -> bool:
        """Whether other workers hold items of ``region`` and ``model`` (seen in ``run``) that may still come to
        this one to send: planned ones, which come back to everyone if their worker stops or dies, and creates
        under way or in doubt, which a taker's reconciler may find never made; and planned ones no worker holds
        (one may be taking them now). A worker's submitting is not over while there are any."""
        if self.worker is None:
            return False
        seen = "" if run is None else " AND last_seen_run = %(run)s"
        row = await self._one(
            f"SELECT EXISTS (SELECT 1 FROM items WHERE batch_id = %(batch)s{seen}"
            " AND state IN ('planned', 'submitting', 'unknown') AND region = %(region)s AND model = %(model)s"
            # A planned row no one holds is counted too: it may be one another worker was taking while this one
            # asked (SKIP LOCKED passes it over without waiting), and is about to hold.
            " AND (owner IS DISTINCT FROM %(me)s) AND (owner IS NOT NULL OR state = 'planned'))",
            {"run": run, "region": region, "model": model},
        )
        return bool(row and row[0])

    async def _iter_state(
        self, state: ItemState, where: str, params: dict[str, Any], order_by: str, page_size: int
    ) -> AsyncIterator[ItemRow]:
        if order_by == "seq":
            key, after = "seq", "seq > %(key)s"
        else:
            key = f"COALESCE({order_by}, 0)"
            after = f"seq > %(after_seq)s AND ({key}, seq) > (%(key)s, %(key_seq)s)"
        sql = (
            f"SELECT {ITEM_COLUMNS} FROM items WHERE batch_id = %(batch)s AND state = %(state)s{where} AND {after}"
            f" ORDER BY {key}, seq LIMIT {page_size}"
        )
        params = {**params, "state": state, "key": params["after_seq"] if order_by == "seq" else -1, "key_seq": -1}
        while True:
            page = [item_row(values) for values in await self._all(sql, params)]
            for row in page:
                yield row
            if len(page) < page_size:
                return
            params["key"] = getattr(page[-1], order_by) or 0
            params["key_seq"] = page[-1].seq

    async def iter_images(
        self, states: Collection[ImageState], *, order_by_deadline: bool = True
    ) -> AsyncIterator[ImageRow]:
        """Images in ``states``, streamed in keyset pages: soonest URL death first (none last), else by item."""
        order: tuple[str, ...] = ("item_id", "image_index")
        if order_by_deadline:
            order = (f"COALESCE(deadline_ms, {_NO_DEADLINE_MS})", *order)
        keys = ", ".join(order)
        after = ", ".join(f"%(k{i})s" for i in range(len(order)))
        # A worker's pending images are those of the items it owns (an image is pending only while its item is
        # generated, an open state); the final ones are the batch's.
        owned = (
            " AND EXISTS (SELECT 1 FROM items WHERE items.batch_id = images.batch_id"
            " AND items.item_id = images.item_id AND items.owner = %(me)s)"
        )

        def sql(state: ImageState) -> str:
            mine = owned if self.worker is not None and state is ImageState.pending else ""
            return (
                f"SELECT {IMAGE_COLUMNS}, {keys} FROM images WHERE batch_id = %(batch)s AND state = %(state)s{mine}"
                f" AND ({keys}) > ({after}) ORDER BY {keys} LIMIT {PAGE_SIZE}"
            )

        start = (-1, "", -1)[-len(order) :]
        streams = [self._image_pages(sql(ImageState(state)), ImageState(state), start) for state in set(states)]
        async for _, image in merged(streams, key=lambda pair: pair[0]):
            yield image

    async def _image_pages(self, sql: str, state: ImageState, key: tuple) -> AsyncIterator[tuple[tuple, ImageRow]]:
        width = len(key)
        while True:
            page = await self._all(sql, {"state": state, **{f"k{i}": k for i, k in enumerate(key)}})
            for values in page:
                key = tuple(values[-width:])
                yield key, image_row(values[:-width])
            if len(page) < PAGE_SIZE:
                return

    async def iter_saved(self) -> AsyncIterator[tuple[ImageRow, ItemRow]]:
        """Every saved image with its item, by item and index: one query a page, not one read an item."""
        sql = (
            f"SELECT {_IMAGE_COLUMNS_OF_JOIN}, {_ITEM_COLUMNS_OF_JOIN} FROM images JOIN items USING (batch_id, item_id)"
            " WHERE images.batch_id = %(batch)s AND images.state = 'saved'"
            " AND (images.item_id, images.image_index) > (%(item_id)s, %(index)s)"
            f" ORDER BY images.item_id, images.image_index LIMIT {PAGE_SIZE}"
        )
        key, item, width = {"item_id": "", "index": -1}, None, len(_IMAGE_FIELDS)
        while True:
            page = await self._all(sql, key)
            for values in page:
                image = image_row(values[:width])
                if item is None or item.item_id != image.item_id:
                    item = item_row(values[width:])
                yield image, item
            if len(page) < PAGE_SIZE:
                return
            key = {"item_id": image.item_id, "index": image.image_index}

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
