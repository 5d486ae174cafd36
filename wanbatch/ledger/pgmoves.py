"""The PostgreSQL ledger's item moves: state transitions, checked by the table, each one committed transaction.

The third layer of :class:`wanbatch.ledger.postgres.PgLedger`. A move is one statement (so one round trip and
its own transaction in autocommit mode): it locks the item if it is in a state the move may start from
(``SELECT ... FOR UPDATE``: under READ COMMITTED a row another transaction moved meanwhile is read again as
it is now, and left out if it is no longer there), updates it, writes its audit row and, back to planned,
forgets its images, returning the new row. That is the compare-and-set that keeps "POST at most once" when
workers on several machines race for one item. Nothing moved means the item is missing or in another state:
only then is it read again, to say which.

``durable`` asks nothing more of PostgreSQL than a commit: with ``synchronous_commit`` on (its default) every
commit is on disk (WAL flushed) before it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from wanbatch.errors import IllegalTransition, LeaseLost, LedgerError
from wanbatch.ledger.moves import check_settable, image_params
from wanbatch.ledger.pgreads import IMAGE_COLUMNS, ITEM_COLUMNS, image_row, item_row
from wanbatch.ledger.pgstreams import PgStreams
from wanbatch.ledger.records import ImageRecord, ItemRow, Recorded
from wanbatch.ledger.states import OPEN_STATES, TRANSITIONS, ItemState, check_transition

__all__ = ["OPEN_LIST", "PgMoves", "move_sql", "pg_image_params", "set_fields"]

_CLEAR_ERROR = {"error_code": "NULL", "error_message": "NULL"}
#: What entering a state does besides setting it (SQL per column); caller-given fields replace these.
_ON_ENTRY: dict[ItemState, dict[str, str]] = {
    # An item allowed several regions has the request's joined list again (its attempt's region was set).
    ItemState.planned: {
        "task_id": "NULL",
        "task_status": "NULL",
        "ended_ms": "NULL",
        "region": "COALESCE(request->>'region', region)",
    },
    # A worker that sends an item holds it until it is final (or the worker is taken over).
    ItemState.submitting: {
        "submit_started_ms": "%(now)s",
        "attempts": "attempts + 1",
        "owner": "COALESCE(%(me)s::text, owner)",
        **_CLEAR_ERROR,
    },
    ItemState.queued: {"submitted_ms": "%(now)s", **_CLEAR_ERROR},
    ItemState.unknown: {},
}
_ON_ENTRY |= {s: {"ended_ms": "COALESCE(ended_ms, %(now)s)"} for s in ItemState if s not in _ON_ENTRY}
# A saved item whose file is found gone is generated again: the worker that found it saves it again.
_ON_ENTRY[ItemState.generated]["owner"] = "COALESCE(%(me)s::text, owner)"
#: The open states as the statements take them.
OPEN_LIST = sorted(str(s) for s in OPEN_STATES)
#: The states each state may be entered from: a move without ``expect`` locks the item only if it is in one.
_SOURCES: dict[ItemState, list[str]] = {
    target: sorted(str(s) for s, targets in TRANSITIONS.items() if target in targets) for target in ItemState
}

_UPSERT_IMAGE = """INSERT INTO images (batch_id, item_id, image_index, state, url, deadline_ms, seed, actual_prompt,
        error_code, error_message, updated_ms)
    VALUES (%(batch)s, %(item_id)s, %(index)s, %(state)s, %(url)s, %(deadline_ms)s, %(seed)s, %(actual_prompt)s,
        %(error_code)s, %(error_message)s, %(now)s)
    ON CONFLICT (batch_id, item_id, image_index) DO UPDATE SET state = excluded.state, url = excluded.url,
        deadline_ms = excluded.deadline_ms, seed = excluded.seed, actual_prompt = excluded.actual_prompt,
        error_code = excluded.error_code, error_message = excluded.error_message, updated_ms = excluded.updated_ms
    WHERE images.state = 'pending'"""
# Billing counts every image the service produced (it gave a URL), saved in time or not.
_COUNT_IMAGES = f"""UPDATE items SET updated_ms = %(now)s,
        images_generated = counted.n, cost = price_per_image * counted.n, actual_prompts = counted.prompts
    FROM (SELECT count(url) AS n,
            COALESCE(jsonb_agg(actual_prompt ORDER BY image_index) FILTER (WHERE actual_prompt IS NOT NULL), '[]')
            AS prompts
          FROM images WHERE batch_id = %(batch)s AND item_id = %(id)s) AS counted
    WHERE batch_id = %(batch)s AND item_id = %(id)s RETURNING {ITEM_COLUMNS}"""
_IMAGES_OF = f"SELECT {IMAGE_COLUMNS} FROM images WHERE batch_id = %(batch)s AND item_id = %(id)s ORDER BY image_index"


class _NotMoved(Exception):
    """A move inside a larger transaction found its item elsewhere (or not at all): roll back, then say why."""


def set_fields(item_fields: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """SQL per column and its parameters for caller-given fields; unknown names are refused."""
    check_settable(item_fields)
    sets: dict[str, str] = {}
    params: dict[str, Any] = {}
    for name, value in item_fields.items():
        if name == "request_id":
            if value:
                sets["request_ids"] = "request_ids || jsonb_build_array(%(f_request_id)s::text)"
                params["f_request_id"] = value
        else:
            sets[name] = f"%(f_{name})s"
            params[f"f_{name}"] = value
    return sets, params


#: A worker moves an open item only while it owns it: one taken over (its worker silent past its lease) is the
#: taker's. A reader or a tool (no worker) is not fenced.
_FENCE = "(%(me)s::text IS NULL OR state <> ALL(%(open)s) OR owner = %(me)s)"


#: A worker taken over takes no item for its own: it would hold it open where no worker takes it over any more.
#: Its row is locked (shared) so that a takeover committing meanwhile is seen, not the row as it was.
_NOT_TAKEN_OVER = (
    "(%(me)s::text IS NULL OR NOT EXISTS (SELECT 1 FROM (SELECT taken_by FROM workers WHERE batch_id = %(batch)s"
    " AND worker_id = %(me)s FOR SHARE) AS worker WHERE worker.taken_by IS NOT NULL))"
)


def move_sql(target: ItemState, fields: Mapping[str, str]) -> str:
    """The one statement of a move to ``target`` from any of ``%(sources)s``, setting ``fields`` (SQL per column,
    after what entering ``target`` sets): the new row, then the state it left."""
    sets = {"state": "%(target)s", "updated_ms": "%(now)s", **_ON_ENTRY[target], **fields}
    assignments = ", ".join(f"{column} = {value}" for column, value in sets.items())
    # Back to planned means no task: the images of an attempt that ended belong to nothing any more.
    fence = f"{_FENCE} AND {_NOT_TAKEN_OVER}" if "owner" in sets else _FENCE
    forget = (
        ", forget AS (DELETE FROM images WHERE batch_id = %(batch)s AND item_id IN (SELECT item_id FROM moved))"
        if target is ItemState.planned
        else ""
    )
    return f"""WITH old AS (
            SELECT item_id AS old_id, state AS old_state FROM items
            WHERE batch_id = %(batch)s AND item_id = %(id)s AND state = ANY(%(sources)s) AND {fence} FOR UPDATE),
        moved AS (
            UPDATE items SET {assignments} FROM old WHERE batch_id = %(batch)s AND item_id = old.old_id
            RETURNING {ITEM_COLUMNS}, old.old_state),
        audit AS (
            INSERT INTO transitions (batch_id, item_id, from_state, to_state, at_ms, note)
            SELECT %(batch)s, item_id, old_state, %(target)s, %(now)s, %(note)s FROM moved){forget}
        SELECT * FROM moved"""


def pg_image_params(batch: int, item_id: str, image: ImageRecord, now: int) -> dict[str, Any]:
    """:func:`~wanbatch.ledger.moves.image_params` for this batch's upsert (the state as text)."""
    params = image_params(item_id, image, now)
    return {**params, "batch": batch, "state": str(params["state"])}


class PgMoves(PgStreams):
    """Item moves over the reads: one transaction each, returning what they wrote."""

    def _move_params(
        self, item_id: str, target: ItemState, expect: ItemState | None, note: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        sources = [str(expect)] if expect is not None else _SOURCES[target]
        return {
            **params,
            "batch": self._batch,
            "me": self.worker,
            "open": OPEN_LIST,
            "id": item_id,
            "sources": sources,
            "target": str(target),
            "now": self._clock.now_ms(),
            "note": note,
        }

    async def transition(
        self,
        item_id: str,
        to: ItemState,
        *,
        expect: ItemState | None = None,
        note: str = "",
        durable: bool = False,
        **item_fields: Any,
    ) -> ItemRow:
        """Move one item to ``to`` in one statement (its own transaction), refusing any move the table does not
        allow; returns the item's new row. With ``expect``, a compare-and-set on that state; without it, on any
        state the table lets the item leave for ``to``. ``durable`` is every commit here (see the module)."""
        target = ItemState(to)
        if expect is not None:
            check_transition(item_id, ItemState(expect), target)
        fields, params = set_fields(item_fields)
        sql = move_sql(target, fields)
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, self._move_params(item_id, target, expect, note, params))
            row = await cur.fetchone()
        if row is None:
            await self._refuse_move(item_id, target, expect)
        return item_row(row)

    async def finish_task(
        self,
        item_id: str,
        to: ItemState,
        *,
        images: Sequence[ImageRecord],
        expect: ItemState | None = None,
        note: str = "",
        durable: bool = False,
        **item_fields: Any,
    ) -> Recorded:
        """The move to generated or failed with the task's results, in one transaction sent as one pipeline (two
        round trips: the statements, then the commit); returns the new row and every image of the item.

        An image already saved or final is left alone; the images generated, cost (at the stored price) and
        actual prompts follow the images the item then has."""
        target = ItemState(to)
        if expect is not None:
            check_transition(item_id, ItemState(expect), target)
        fields, params = set_fields(item_fields)
        values = self._move_params(item_id, target, expect, note, params)
        rows = [pg_image_params(self._batch, item_id, image, values["now"]) for image in images]  # refused early
        key = {"batch": self._batch, "id": item_id, "now": values["now"]}
        try:
            async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                moved = await conn.execute(move_sql(target, fields), values)
                if rows:
                    await conn.cursor().executemany(_UPSERT_IMAGE, rows)
                counted = await conn.execute(_COUNT_IMAGES, key)
                recorded = await conn.execute(_IMAGES_OF, key)
                if await moved.fetchone() is None:
                    raise _NotMoved
                row, images_now = await counted.fetchone(), await recorded.fetchall()
        except (_NotMoved, psycopg.errors.ForeignKeyViolation):
            await self._refuse_move(item_id, target, expect)
        return Recorded(row=item_row(row), images=tuple(image_row(image) for image in images_now))

    async def update(self, item_id: str, **item_fields: Any) -> ItemRow:
        """Set non-state fields (request_id is appended) in one statement; returns the item's row."""
        if "state" in item_fields:
            raise LedgerError("update() does not change state; use transition(), which checks the move")
        fields, params = set_fields(item_fields)
        if not fields:
            return await self.get(item_id)  # nothing to write (an empty request_id)
        sets = ", ".join(f"{column} = {value}" for column, value in {"updated_ms": "%(now)s", **fields}.items())
        row = await self._one(
            f"UPDATE items SET {sets} WHERE batch_id = %(batch)s AND item_id = %(id)s AND {_FENCE}"
            f" RETURNING {ITEM_COLUMNS}",
            {**params, "id": item_id, "now": self._clock.now_ms(), "open": OPEN_LIST},
        )
        if row is None:
            await self._check_owner(item_id)
            raise LedgerError(f"no item {item_id} in {self.path}")
        return item_row(row)

    async def _move_in(
        self,
        conn: psycopg.AsyncConnection,
        item_id: str,
        source: ItemState,
        target: ItemState,
        *,
        note: str,
        fields: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ItemRow | None:
        """A move from ``source`` inside the caller's transaction; None when the item is no longer there."""
        sql = move_sql(target, fields or {})
        cur = await conn.execute(sql, self._move_params(item_id, target, source, note, params or {}))
        row = await cur.fetchone()
        return None if row is None else item_row(row)

    async def _check_owner(self, item_id: str) -> None:
        """:class:`LeaseLost` when the item is open and another worker owns it: this one was taken over."""
        if self.worker is None:
            return
        row = await self._one(
            "SELECT state, owner, (SELECT taken_by FROM workers WHERE batch_id = %(batch)s AND worker_id = %(me)s)"
            " FROM items WHERE batch_id = %(batch)s AND item_id = %(id)s",
            {"id": item_id},
        )
        if row is None:
            return
        state, owner, taken_by = row
        if taken_by is not None or (ItemState(state) in OPEN_STATES and owner != self.worker):
            raise LeaseLost(
                f"item {item_id} is {state}{f' and held by worker {owner}' if owner else ''}; this worker"
                f" ({self.worker}) was silent past its lease and taken over by {taken_by or owner}: it moves no item"
                " any more"
            )

    async def _refuse_move(self, item_id: str, target: ItemState, expect: ItemState | None) -> None:
        """Say why nothing moved: no such item (:class:`LedgerError`), or it is in another state
        (:class:`IllegalTransition` naming both), or it is another worker's now (:class:`LeaseLost`)."""
        await self._check_owner(item_id)
        actual = await self.state_of(item_id)
        if expect is not None:
            raise IllegalTransition(
                f"item {item_id}: refused {expect} → {target}: it is {actual} now, not {expect}"
                " (another caller moved it first)"
            )
        check_transition(item_id, actual, target)
        # It was elsewhere when the move looked, and another caller has brought it where it may move from.
        raise IllegalTransition(f"item {item_id}: refused → {target}: another caller moved it meanwhile (now {actual})")
