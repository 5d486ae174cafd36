"""The PostgreSQL ledger's streams: items and images read in keyset pages, and a worker's taking of planned items.

The second layer of :class:`wanbatch.ledger.postgres.PgLedger`, over :mod:`wanbatch.ledger.pgreads`. A stream
reads in keyset pages (one statement a page, on whichever connection is free), so no transaction stays open while
the caller works, and a row moved while iterating is not repeated. A worker of a fleet (``worker`` set) streams
only the open items it owns, and takes planned ones for itself (:meth:`PgStreams.take_planned`).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import fields
from typing import Any

from wanbatch.errors import LedgerError
from wanbatch.ledger.pgreads import IMAGE_COLUMNS, ITEM_COLUMNS, PgReads, image_row, item_row
from wanbatch.ledger.reads import NO_DEADLINE_MS, ORDERABLE, PAGE_SIZE
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.ledger.states import OPEN_STATES, ImageState, ItemState

__all__ = ["PAGE_SIZE", "PgStreams", "merged"]

_DONE = object()  #: the end of a stream, for ``anext``

_ITEM_FIELDS = tuple(f.name for f in fields(ItemRow))
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRow))
#: Both tables have some columns of the same name (state, error_code, ...): a join names its table's.
_ITEM_COLUMNS_OF_JOIN = ", ".join(f"items.{name}" for name in _ITEM_FIELDS)
_IMAGE_COLUMNS_OF_JOIN = ", ".join(f"images.{name}" for name in _IMAGE_FIELDS)


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


class PgStreams(PgReads):
    """Streams of one batch's items and images, and the planned items a worker takes; the layers above write."""

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
        if order_by not in ORDERABLE:
            raise LedgerError(f"cannot order items by {order_by!r}; choose one of {', '.join(sorted(ORDERABLE))}")
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
            order = (f"COALESCE(deadline_ms, {NO_DEADLINE_MS})", *order)
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
