"""The SQLite ledger's queries: rows by id, streams of items and images, counts and the run's history.

The first layer of :class:`wanbatch.ledger.sqlite.Ledger`: it holds the connection and changes nothing.
Streams read in keyset pages, so no read transaction stays open while the caller works, and a row moved
while iterating is not repeated.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import sqlite3
from collections.abc import Collection, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from wanbatch.clock import Clock
from wanbatch.errors import LedgerError
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["END_OF_TIME_MS", "IMAGE_COLUMNS", "ITEM_COLUMNS", "NO_DEADLINE_MS", "ORDERABLE", "PAGE_SIZE", "LedgerReads"]

#: Rows fetched per query by the streaming iterators; pages keep no read transaction open between them.
PAGE_SIZE = 1000
NO_DEADLINE_MS = 2**62  #: sorts an image without a deadline after every real one
END_OF_TIME_MS = 2**62
_IDS_PER_QUERY = 500  #: ids bound in one query: well under SQLite's limit on a statement's parameters
ORDERABLE = frozenset({"seq", "submit_started_ms", "submitted_ms", "updated_ms"})

ITEM_COLUMNS = ", ".join(f.name for f in fields(ItemRow))
IMAGE_COLUMNS = ", ".join(f.name for f in fields(ImageRow))
_ITEM_FIELDS = tuple(f.name for f in fields(ItemRow))
_IMAGE_FIELDS = tuple(f.name for f in fields(ImageRow))
#: Both tables have some columns of the same name (state, error_code, ...): a join names its table's.
_ITEM_COLUMNS_OF_JOIN = ", ".join(f"items.{name}" for name in _ITEM_FIELDS)
_IMAGE_COLUMNS_OF_JOIN = ", ".join(f"images.{name}" for name in _IMAGE_FIELDS)


def _chunks(values: list[str]) -> Iterator[list[str]]:
    """``values`` in runs of at most _IDS_PER_QUERY, for ``IN (...)`` lists."""
    for start in range(0, len(values), _IDS_PER_QUERY):
        yield values[start : start + _IDS_PER_QUERY]


class LedgerReads:
    """Reads of one ledger connection; the layers above it write."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Clock) -> None:
        self._conn, self.path, self._clock = conn, path, clock

    # ── one item ────────────────────────────────────────────────────────────────────────────────────

    def get(self, item_id: str) -> ItemRow:
        row = self._conn.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemRow.from_row(row)

    def get_many(self, item_ids: Collection[str]) -> list[ItemRow]:
        """The rows of ``item_ids``, in no set order, a query per few hundred ids; :class:`LedgerError` names the
        first id that has none."""
        wanted, rows = list(dict.fromkeys(item_ids)), []
        for chunk in _chunks(wanted):
            marks = ", ".join("?" * len(chunk))
            found = self._conn.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id IN ({marks})", chunk)
            rows.extend(ItemRow.from_row(row) for row in found.fetchall())
        if len(rows) < len(wanted):
            missing = sorted(set(wanted) - {row.item_id for row in rows})
            raise LedgerError(f"no item {missing[0]} in {self.path}")
        return rows

    def state_of(self, item_id: str) -> ItemState:
        """The item's state alone: one column, for the stages that need nothing else of the row."""
        return self._state_of(self._conn, item_id)

    def _state_of(self, conn: sqlite3.Connection, item_id: str) -> ItemState:
        row = conn.execute("SELECT state FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemState(row[0])

    def known_tasks(self, task_ids: Collection[str]) -> set[str]:
        """Which of ``task_ids`` an item holds, to match a page of the service's task list against the ledger."""
        known: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(task_ids))):
            marks = ", ".join("?" * len(chunk))
            found = self._conn.execute(f"SELECT task_id FROM items WHERE task_id IN ({marks})", chunk)
            known.update(task_id for (task_id,) in found.fetchall())
        return known

    def times_unknown(self, item_id: str) -> int:
        """How many of the item's attempts ended with their outcome unknown."""
        sql = "SELECT count(*) FROM transitions WHERE item_id = ? AND to_state = 'unknown'"
        return self._conn.execute(sql, (item_id,)).fetchone()[0]

    def images_of(self, item_id: str) -> list[ImageRow]:
        """The item's images, by index."""
        return self._images_of(self._conn, item_id)

    @staticmethod
    def _images_of(conn: sqlite3.Connection, item_id: str) -> list[ImageRow]:
        rows = conn.execute(
            f"SELECT {IMAGE_COLUMNS} FROM images WHERE item_id = ? ORDER BY image_index", (item_id,)
        ).fetchall()
        return [ImageRow.from_row(row) for row in rows]

    # ── the runs and their attempts ─────────────────────────────────────────────────────────────────

    def stale_count(self, run: int) -> int:
        """Items the manifest of ``run`` no longer has; they are left as they are."""
        # A scan, not an index: it runs once per run, and an index here would slow every resume's marking.
        return self._conn.execute("SELECT count(*) FROM items WHERE last_seen_run < ?", (run,)).fetchone()[0]

    def run_spans(self, at_ms: Collection[int]) -> dict[int, tuple[int, int]]:
        """For each time of ``at_ms`` (our clock), when the run going on then began, and when the next one did
        (or the end of time): the attempts in that span were made by one process, with one key, on one clock."""
        # A folder has few runs: read their starts once and place every time among them.
        starts = [row[0] for row in self._conn.execute("SELECT started_ms FROM runs ORDER BY started_ms")]
        spans = {}
        for at in at_ms:
            after = bisect.bisect_right(starts, at)
            spans[at] = (starts[after - 1] if after else 0, starts[after] if after < len(starts) else END_OF_TIME_MS)
        return spans

    def recent_tasks(
        self,
        region: str,
        limit: int,
        *,
        since_ms: int = 0,
        until_ms: int = END_OF_TIME_MS,
        account: str | None = None,
    ) -> list[tuple[str, int]]:
        """The newest tasks the ledger knows in ``region`` (made by ``account``'s key, if given) whose attempts
        began in [``since_ms``, ``until_ms``), with when they began (our clock, ms)."""
        # From the audit's end, not the items: in a big run the items with tasks are few among the planned.
        rows = self._conn.execute(
            """SELECT items.task_id, items.submit_started_ms FROM transitions JOIN items USING (item_id)
               WHERE transitions.to_state = 'queued' AND items.region = ? AND items.task_id IS NOT NULL
                 AND items.submit_started_ms >= ? AND items.submit_started_ms < ?
                 AND (? IS NULL OR items.account = ?)
               ORDER BY transitions.id DESC LIMIT ?""",
            (region, since_ms, until_ms, account, account, limit * 4),
        ).fetchall()
        return list(dict.fromkeys((task_id, started) for task_id, started in rows))[:limit]

    # ── streams ─────────────────────────────────────────────────────────────────────────────────────

    def iter_items(
        self,
        states: Collection[ItemState],
        *,
        run: int | None = None,
        region: str | None = None,
        model: str | None = None,
        after_seq: int = 0,
        order_by: str = "seq",
        limit: int | None = None,
    ) -> Iterator[ItemRow]:
        """Items in ``states``, streamed in pages, ordered by ``order_by``; optionally only those seen in
        ``run``, of one ``region`` and ``model``, and after manifest position ``after_seq``.

        ``order_by`` is ``seq`` (manifest order, read from the index) or a time column (sorted per page:
        meant for the small open states such as queued). An item moved while iterating is not repeated.
        """
        if order_by not in ORDERABLE:
            raise LedgerError(f"cannot order items by {order_by!r}; choose one of {', '.join(sorted(ORDERABLE))}")
        where = "".join(
            f" AND {column} = :{column}"
            for column, value in (("last_seen_run", run), ("region", region), ("model", model))
            if value is not None
        )
        params = {"last_seen_run": run, "region": region, "model": model, "after_seq": after_seq}
        page_size = min(PAGE_SIZE, limit) if limit else PAGE_SIZE  # a caller that wants a few reads a few
        streams = [self._iter_state(ItemState(s), where, params, order_by, page_size) for s in set(states)]
        merged = heapq.merge(*streams, key=lambda r: (getattr(r, order_by) or 0, r.seq))
        return itertools.islice(merged, limit)

    def _iter_state(
        self, state: ItemState, where: str, params: dict[str, Any], order_by: str, page_size: int = PAGE_SIZE
    ) -> Iterator[ItemRow]:
        """One state's items by keyset pages: no read transaction stays open while the caller works."""
        if order_by == "seq":
            key, after = "seq", "seq > :key"
        else:
            key = f"COALESCE({order_by}, 0)"
            after = f"seq > :after_seq AND ({key}, seq) > (:key, :key_seq)"
        sql = (
            f"SELECT {ITEM_COLUMNS} FROM items WHERE state = :state{where} AND {after}"
            f" ORDER BY {key}, seq LIMIT {page_size}"
        )
        params = {**params, "state": state, "key": params["after_seq"] if order_by == "seq" else -1, "key_seq": -1}
        while True:
            page = self._conn.execute(sql, params).fetchall()
            for row in page:
                yield ItemRow.from_row(row)
            if len(page) < page_size:
                return
            params["key"] = page[-1][order_by] or 0
            params["key_seq"] = page[-1]["seq"]

    def iter_images(self, states: Collection[ImageState], *, order_by_deadline: bool = True) -> Iterator[ImageRow]:
        """Images in ``states``, streamed in keyset pages: soonest URL death first (none last), else by item."""
        order = ("item_id", "image_index")
        if order_by_deadline:
            order = (f"COALESCE(deadline_ms, {NO_DEADLINE_MS})", *order)
        keys = ", ".join(order)
        after = ", ".join(f":k{i}" for i in range(len(order)))
        sql = (
            f"SELECT {IMAGE_COLUMNS}, {keys} FROM images WHERE state = :state AND ({keys}) > ({after})"
            f" ORDER BY {keys} LIMIT {PAGE_SIZE}"
        )
        start = (-1, "", -1)[-len(order) :]
        streams = [self._image_pages(sql, ImageState(state), start) for state in set(states)]
        return (image for _, image in heapq.merge(*streams, key=lambda pair: pair[0]))

    def _image_pages(self, sql: str, state: ImageState, key: tuple) -> Iterator[tuple[tuple, ImageRow]]:
        while True:
            page = self._conn.execute(sql, {"state": state, **{f"k{i}": k for i, k in enumerate(key)}}).fetchall()
            for row in page:
                key = tuple(row)[-len(key) :]
                yield key, ImageRow.from_row(row)
            if len(page) < PAGE_SIZE:
                return

    def iter_saved(self) -> Iterator[tuple[ImageRow, ItemRow]]:
        """Every saved image with its item, by item and index: one query a page, not one read an item."""
        sql = (
            f"SELECT {_IMAGE_COLUMNS_OF_JOIN}, {_ITEM_COLUMNS_OF_JOIN} FROM images JOIN items USING (item_id)"
            " WHERE images.state = 'saved' AND (images.item_id, images.image_index) > (:item_id, :index)"
            f" ORDER BY images.item_id, images.image_index LIMIT {PAGE_SIZE}"
        )
        key, item = {"item_id": "", "index": -1}, None
        while True:
            page = self._conn.execute(sql, key).fetchall()
            for values in page:
                image = ImageRow.from_row(dict(zip(_IMAGE_FIELDS, values[: len(_IMAGE_FIELDS)], strict=True)))
                if item is None or item.item_id != image.item_id:
                    item = ItemRow.from_row(dict(zip(_ITEM_FIELDS, values[len(_IMAGE_FIELDS) :], strict=True)))
                yield image, item
            if len(page) < PAGE_SIZE:
                return
            key = {"item_id": image.item_id, "index": image.image_index}

    # ── counts ──────────────────────────────────────────────────────────────────────────────────────

    def take_planned(self, *, run: int | None, region: str, model: str, after_seq: int, limit: int) -> list[ItemRow]:
        """Up to ``limit`` planned items of ``region`` and ``model`` (seen in ``run``) after ``after_seq``, in
        manifest order: all this process's to send, since it holds the folder's lock."""
        planned = self.iter_items(
            [ItemState.planned], run=run, region=region, model=model, after_seq=after_seq, limit=limit
        )
        return list(planned)

    def held_elsewhere(self, *, run: int | None, region: str, model: str) -> bool:
        """No other process holds items of a folder this one has locked."""
        return False

    def lanes(self, states: Collection[ItemState], *, run: int | None = None) -> set[tuple[str, str]]:
        """The (region, model) pairs that have items in ``states`` (seen in ``run``, if given): the submit lanes a
        run needs."""
        marks = ", ".join("?" for _ in states)
        seen = "" if run is None else " AND last_seen_run = ?"
        params = [ItemState(s) for s in states] + ([] if run is None else [run])
        rows = self._conn.execute(
            f"SELECT DISTINCT region, model FROM items WHERE state IN ({marks}){seen}", params
        ).fetchall()
        return {(region, model) for region, model in rows}

    def account_lanes(self, states: Collection[ItemState]) -> set[tuple[str, str, str]]:
        """The (region, account, model) of items in ``states`` (meant for the few open ones): whose key made
        what is in flight, so that a resume follows and reconciles each with its own account."""
        marks = ", ".join("?" for _ in states)
        rows = self._conn.execute(
            f"SELECT DISTINCT region, account, model FROM items WHERE state IN ({marks})",
            [ItemState(s) for s in states],
        ).fetchall()
        return {(region, account, model) for region, account, model in rows}

    def account_summary(self) -> dict[str, dict[str, Any]]:
        """Per account of a pool (items whose latest attempt was made by a named account): items per state,
        images generated and saved, cost per currency. Reads every item: for reports, not for a loop."""
        found: dict[str, dict[str, Any]] = {}
        for account, state, count, generated, cost, currency in self._conn.execute(
            "SELECT account, state, count(*), SUM(images_generated), SUM(cost), currency FROM items"
            " WHERE account != '' GROUP BY account, state, currency"
        ):
            entry = found.setdefault(account, {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}})
            entry["items"][state] = entry["items"].get(state, 0) + count
            entry["images_generated"] += generated or 0
            entry["cost"][currency] = round(entry["cost"].get(currency, 0.0) + (cost or 0.0), 6)
        for account, saved in self._conn.execute(
            "SELECT items.account, count(*) FROM images JOIN items USING (item_id)"
            " WHERE images.state = 'saved' AND items.account != '' GROUP BY items.account"
        ):
            found.setdefault(account, {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}})
            found[account]["images_saved"] = saved
        return found

    def counts(self, *, run: int | None = None) -> dict[ItemState, int]:
        """Items per state, every state present (zeros included); only those seen in ``run`` if given."""
        if run is None:
            found = dict(self._conn.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
        else:
            found = dict(
                self._conn.execute(
                    "SELECT state, count(*) FROM items WHERE last_seen_run = ? GROUP BY state", (run,)
                ).fetchall()
            )
        return {state: found.get(state, 0) for state in ItemState}

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def spent_cost(self) -> float:
        """What the service has billed so far: the images every task generated, at the planned price."""
        return float(self._conn.execute("SELECT COALESCE(SUM(cost), 0) FROM items").fetchone()[0])

    def planned_images(self) -> int:
        """How many images the items ask for, at n each."""
        return self._conn.execute("SELECT COALESCE(SUM(n_images), 0) FROM items").fetchone()[0]

    def summary(self) -> dict[str, Any]:
        """Counts per item and image state, images billed, and cost per currency (spent, and planned at n each)."""
        images = dict(self._conn.execute("SELECT state, count(*) FROM images GROUP BY state").fetchall())
        money = self._conn.execute(
            "SELECT currency, SUM(images_generated), SUM(cost), SUM(price_per_image * n_images)"
            " FROM items GROUP BY currency"
        ).fetchall()
        runs = self._conn.execute("SELECT COALESCE(MAX(run), 0) FROM runs").fetchone()[0]
        return {
            "items": {str(state): n for state, n in self.counts().items()},
            "images": {str(state): images.get(state, 0) for state in ImageState},
            "images_generated": sum(row[1] for row in money),
            "cost": {row[0]: round(row[2], 6) for row in money},
            "cost_planned": {row[0]: round(row[3], 6) for row in money},
            "runs": runs,
        }
