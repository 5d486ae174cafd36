"""The SQLite ledger's item moves: state transitions, checked by the table, each one committed transaction.

The second layer of :class:`wanbatch.ledger.sqlite.Ledger`. Every move is a compare-and-set on the item's
state with its audit row, committed before the network action that depends on it; each returns the row it
wrote (``UPDATE ... RETURNING``), so that no caller reads back what it has just written.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from wanbatch.errors import IllegalTransition, LedgerError
from wanbatch.ledger.reads import ITEM_COLUMNS, LedgerReads
from wanbatch.ledger.records import ImageRecord, ItemLike, ItemRow, Recorded
from wanbatch.ledger.states import ImageState, ItemState, check_transition

__all__ = ["SETTABLE_FIELDS", "ItemMoves", "canonical_json", "check_settable", "image_params", "item_values"]

_UPSERT_IMAGE = """INSERT INTO images (item_id, image_index, state, url, deadline_ms, seed, actual_prompt,
        error_code, error_message, updated_ms)
    VALUES (:item_id, :index, :state, :url, :deadline_ms, :seed, :actual_prompt, :error_code, :error_message, :now)
    ON CONFLICT (item_id, image_index) DO UPDATE SET state = excluded.state, url = excluded.url,
        deadline_ms = excluded.deadline_ms, seed = excluded.seed, actual_prompt = excluded.actual_prompt,
        error_code = excluded.error_code, error_message = excluded.error_message, updated_ms = excluded.updated_ms
    WHERE images.state = 'pending'"""

_CLEAR_ERROR = ("error_code = NULL", "error_message = NULL")
#: What entering a state does besides setting it. Caller-given fields come later in the SET list, so they win.
_ON_ENTRY: dict[ItemState, tuple[str, ...]] = {
    # A planned item has no task: it is either new or known to have created none. Its region is the request's
    # again: an item allowed several regions ("beijing|singapore") had the one of its attempt.
    ItemState.planned: (
        "task_id = NULL",
        "task_status = NULL",
        "ended_ms = NULL",
        "region = COALESCE(json_extract(request, '$.region'), region)",
    ),
    # A new attempt, or a task at last: the error that held the item back is history (the audit keeps it).
    ItemState.submitting: ("submit_started_ms = :now", "attempts = attempts + 1", *_CLEAR_ERROR),
    ItemState.queued: ("submitted_ms = :now", *_CLEAR_ERROR),
    ItemState.unknown: (),
}
# Every other state ends the item's life on the service (or its download): the first of them stamps the end.
_ON_ENTRY |= {state: ("ended_ms = COALESCE(ended_ms, :now)",) for state in ItemState if state not in _ON_ENTRY}
#: Columns a caller may set with ``transition`` or ``update``; ``request_id`` is appended to ``request_ids``.
#: The times and ``attempts`` are set on entering a state (``_ON_ENTRY``); a caller may give its own.
SETTABLE_FIELDS = frozenset(
    {"task_id", "task_status", "error_code", "error_message", "attempts", "cost", "endpoint", "account"}
    | {"region", "price_per_image"}  # where an item allowed several regions is sent, and its price there
    | {"submit_started_ms", "submitted_ms", "ended_ms"}
)

#: Canonical JSON: the same value always gives the same text. One encoder, built once: planning is hot.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
canonical_json = _ENCODER.encode


def item_values(item: ItemLike, price_of: Callable[[ItemLike], float] | None, currency: str) -> tuple[Any, ...]:
    """What every ledger stores of a planned item, in this order: item_id, replica, region, model, n, request,
    source, entry, variables, output, price per image, currency (positional: planning a million items is hot)."""
    return (
        item.item_id,
        item.replica,
        item.region,
        item.model,
        item.n,
        # The manifest's items carry their request's canonical JSON, made for the id: not encoded again.
        getattr(item, "request_json", "") or canonical_json(item.request()),
        item.source or "",
        item.entry or "",
        canonical_json(dict(item.variables)) if item.variables else "{}",
        item.output,
        float(price_of(item)) if price_of else 0.0,
        currency,
    )


class ItemMoves(LedgerReads):
    """Item moves over the reads: one write transaction each, returning what they wrote."""

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so a read-then-write cannot race."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _durable_tx(self, durable: bool) -> Iterator[sqlite3.Connection]:
        """:meth:`_tx`, fsynced at its commit when ``durable`` (the WAL's NORMAL sync is the rule otherwise)."""
        if durable:
            self._conn.execute("PRAGMA synchronous = FULL")  # read at commit: this one fsyncs the WAL
        try:
            with self._tx() as conn:
                yield conn
        finally:
            if durable:
                self._conn.execute("PRAGMA synchronous = NORMAL")

    def transition(
        self,
        item_id: str,
        to: ItemState,
        *,
        expect: ItemState | None = None,
        note: str = "",
        durable: bool = False,
        **item_fields: Any,
    ) -> ItemRow:
        """Move one item to ``to`` in one committed transaction, refusing any move the table does not allow;
        returns the item's new row.

        With ``expect``, the move happens only if the item is still in that state (compare-and-set), so a
        stale caller cannot move an item twice; without it, the item's state is read in the transaction.
        ``item_fields``: task_id, task_status, error_code, error_message, request_id (appended to request_ids).
        """
        target = ItemState(to)
        if expect is not None:
            check_transition(item_id, ItemState(expect), target)
        assignments, params = set_clauses(item_fields)
        now = self._clock.now_ms()
        with self._durable_tx(durable) as conn:
            source = ItemState(expect) if expect is not None else self._state_of(conn, item_id)
            return self._move(conn, item_id, source, target, note=note, now=now, extra=assignments, params=params)

    def finish_task(
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
        """Record a finished task's results with its item's move (to generated or failed), in one commit;
        returns the new row and every image the item has, for the downloader.

        The images are upserted by index (one already saved or final is left alone); the item's images
        generated, cost (at the price stored when it was planned) and actual prompts follow them.
        """
        target = ItemState(to)
        if expect is not None:
            check_transition(item_id, ItemState(expect), target)
        assignments, params = set_clauses(item_fields)
        now = self._clock.now_ms()
        rows = [image_params(item_id, image, now) for image in images]  # refused before anything is written
        with self._durable_tx(durable) as conn:
            source = ItemState(expect) if expect is not None else self._state_of(conn, item_id)
            self._move(conn, item_id, source, target, note=note, now=now, extra=assignments, params=params)
            conn.executemany(_UPSERT_IMAGE, rows)
            recorded = self._images_of(conn, item_id)
            # Billing counts every image the service produced (it gave a URL), saved in time or not.
            count = sum(1 for image in recorded if image.url is not None)
            prompts = [image.actual_prompt for image in recorded if image.actual_prompt is not None]
            row = conn.execute(
                "UPDATE items SET images_generated = :count, cost = price_per_image * :count,"
                f" actual_prompts = :prompts, updated_ms = :now WHERE item_id = :item_id RETURNING {ITEM_COLUMNS}",
                {"count": count, "prompts": canonical_json(prompts), "now": now, "item_id": item_id},
            ).fetchall()[0]
        return Recorded(row=ItemRow.from_row(row), images=tuple(recorded))

    def update(self, item_id: str, **item_fields: Any) -> ItemRow:
        """Set non-state fields (task_status, error_code, ...; request_id is appended) in one transaction;
        returns the item's row."""
        if "state" in item_fields:
            raise LedgerError("update() does not change state; use transition(), which checks the move")
        assignments, params = set_clauses(item_fields)
        if not assignments:
            return self.get(item_id)  # nothing to write (an empty request_id)
        sets = ", ".join(("updated_ms = :now", *assignments))
        with self._tx() as conn:
            rows = conn.execute(
                f"UPDATE items SET {sets} WHERE item_id = :item_id RETURNING {ITEM_COLUMNS}",
                {**params, "item_id": item_id, "now": self._clock.now_ms()},
            ).fetchall()
        if not rows:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemRow.from_row(rows[0])

    def _move(
        self,
        conn: sqlite3.Connection,
        item_id: str,
        source: ItemState,
        target: ItemState,
        *,
        note: str,
        now: int,
        extra: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
        refuse: bool = True,
    ) -> ItemRow | None:
        """The compare-and-set update and its audit row; the caller holds the transaction. An item no longer
        in ``source`` is refused (:class:`IllegalTransition`), or with ``refuse=False`` left alone (None)."""
        check_transition(item_id, source, target)
        sets = ", ".join(("state = :target", "updated_ms = :now", *_ON_ENTRY[target], *extra))
        values = {**(params or {}), "item_id": item_id, "source": source, "target": target, "now": now}
        moved = conn.execute(
            f"UPDATE items SET {sets} WHERE item_id = :item_id AND state = :source RETURNING {ITEM_COLUMNS}", values
        ).fetchall()
        if not moved:
            if not refuse:
                return None
            actual = self._state_of(conn, item_id)
            raise IllegalTransition(
                f"item {item_id}: refused {source} → {target}: it is {actual} now, not {source}"
                " (another caller moved it first)"
            )
        if target is ItemState.planned:
            # Back to planned means no task: the images of a failed attempt belong to nothing any more.
            conn.execute("DELETE FROM images WHERE item_id = ?", (item_id,))
        conn.execute(
            "INSERT INTO transitions (item_id, from_state, to_state, at_ms, note) VALUES (?, ?, ?, ?, ?)",
            (item_id, source, target, now, note),
        )
        return ItemRow.from_row(moved[0])


def image_params(item_id: str, image: ImageRecord, now: int) -> dict[str, Any]:
    """The values of one result's image upsert (every ledger's): its state checked, pending or failed."""
    return {
        "item_id": item_id,
        "index": image.index,
        "state": _recorded_state(image),
        "url": image.url,
        "deadline_ms": image.deadline_ms,
        "seed": image.seed,
        "actual_prompt": image.actual_prompt,
        "error_code": image.error_code,
        "error_message": image.error_message,
        "now": now,
    }


def _recorded_state(image: ImageRecord) -> ImageState:
    """A task's result is pending (it has a URL to fetch) or failed (the service says so)."""
    state = ImageState(image.state) if image.state else ImageState.pending if image.url else ImageState.failed
    if state is ImageState.failed or (state is ImageState.pending and image.url):
        return state
    raise LedgerError(f"image {image.index}: a result is recorded pending with a url, or failed; got {state}")


def set_clauses(item_fields: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """SET fragments and their parameters for caller-given fields; unknown names are refused."""
    check_settable(item_fields)
    sets: list[str] = []
    params: dict[str, Any] = {}
    for name, value in item_fields.items():
        if name == "request_id":
            if value:
                sets.append("request_ids = json_insert(request_ids, '$[#]', :f_request_id)")
                params["f_request_id"] = value
        else:
            sets.append(f"{name} = :f_{name}")
            params[f"f_{name}"] = value
    return sets, params


def check_settable(names: Iterable[str]) -> None:
    """Refuse a field a ledger's caller may not set (:data:`SETTABLE_FIELDS`, or ``request_id``, appended)."""
    for name in names:
        if name != "request_id" and name not in SETTABLE_FIELDS:
            allowed = ", ".join(sorted(SETTABLE_FIELDS | {"request_id"}))
            raise LedgerError(f"the ledger has no settable field {name!r}; settable: {allowed}")
