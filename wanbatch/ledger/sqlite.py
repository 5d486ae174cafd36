"""The durable ledger of a run: every item, image and state move, in SQLite.

One file, ``ledger.sqlite``, in the run folder. Every state transition is one
committed transaction, made *before* the network action that depends on it,
so that a run killed at any instant can be resumed from here with nothing
lost and nothing paid twice (see the money rules in shared/DESIGN.md).

The interface is narrow on purpose (open, add, transition, iterate, count) so
that a database shared by several machines can stand behind it later.
A commit that a request is sent on the strength of (``durable=True``: the
``submitting`` move before a POST) is fsynced before it returns (WAL with
``synchronous=FULL`` for that commit), so it survives a power loss too; the
others survive a crash of the process (WAL, ``synchronous=NORMAL``), and a
power loss can only undo them back to a state a resume heals (a task found
again in the list, an image fetched again). Calls are short, so the engine
makes them from the event loop directly, from one thread.

The ledger is never given an API key and has no column that could hold one.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from wanbatch.clock import Clock
from wanbatch.errors import IllegalTransition, LedgerError
from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow
from wanbatch.ledger.runlock import RunLock
from wanbatch.ledger.states import IMAGE_TRANSITIONS, ImageState, ItemState, check_transition

__all__ = [
    "LEDGER_FILE",
    "SCHEMA_VERSION",
    "AddResult",
    "ImageRecord",
    "ImageRow",
    "ItemLike",
    "ItemRow",
    "Ledger",
    "RunLock",
    "read_meta",
]

LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = 2
#: Columns added to ``items`` since version 1, with their definitions: an older ledger gains them when opened.
_ADDED_COLUMNS = {"endpoint": "TEXT", "more_sources": "TEXT NOT NULL DEFAULT '[]'"}
#: How long a writer waits for another connection's write lock (``wanbatch status`` reads while a run writes).
BUSY_TIMEOUT_S = 10.0
CACHE_KIB = 64 * 1024
WAL_LIMIT_BYTES = 64 * 1024 * 1024
CHECKPOINT_PAGES = 1000  #: SQLite's default, restored after planning
#: Planning commits this many items at a time: each commit rewrites every index page it touched, and item
#: ids land at random places in their index, so fewer, larger commits cost much less. Losing an uncommitted
#: part of a plan costs nothing: planning sends nothing, and the next run plans it again.
ROWS_PER_COMMIT = 50_000
_NO_DEADLINE_MS = 2**62  #: sorts an image without a deadline after every real one
#: Rows fetched per query by the streaming iterators; pages keep no read transaction open between them.
PAGE_SIZE = 1000

_STATES_SQL = ", ".join(f"'{s}'" for s in ItemState)
_IMAGE_STATES_SQL = ", ".join(f"'{s}'" for s in ImageState)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY, started_ms INTEGER NOT NULL, pid INTEGER NOT NULL)",
    # seq is the order in which the manifest first produced the item: "manifest order" for the submitter.
    f"""CREATE TABLE IF NOT EXISTS items (
        seq INTEGER PRIMARY KEY,
        item_id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
        replica INTEGER NOT NULL, region TEXT NOT NULL, model TEXT NOT NULL, n_images INTEGER NOT NULL,
        request TEXT NOT NULL, source TEXT NOT NULL, entry TEXT NOT NULL, variables TEXT NOT NULL,
        output TEXT, price_per_image REAL NOT NULL, currency TEXT NOT NULL,
        task_id TEXT, request_ids TEXT NOT NULL DEFAULT '[]', task_status TEXT,
        error_code TEXT, error_message TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        actual_prompts TEXT NOT NULL DEFAULT '[]', images_generated INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL DEFAULT 0,
        planned_ms INTEGER NOT NULL, submit_started_ms INTEGER, submitted_ms INTEGER, ended_ms INTEGER,
        updated_ms INTEGER NOT NULL, first_seen_run INTEGER NOT NULL, last_seen_run INTEGER NOT NULL,
        endpoint TEXT, more_sources TEXT NOT NULL DEFAULT '[]')""",
    # (state, seq) serves "the next planned items in manifest order" and counts per state from the index alone.
    "CREATE INDEX IF NOT EXISTS items_state_seq ON items (state, seq)",
    "CREATE INDEX IF NOT EXISTS items_task_id ON items (task_id) WHERE task_id IS NOT NULL",
    f"""CREATE TABLE IF NOT EXISTS images (
        item_id TEXT NOT NULL REFERENCES items (item_id),
        image_index INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_IMAGE_STATES_SQL})),
        url TEXT, deadline_ms INTEGER, seed INTEGER, actual_prompt TEXT,
        file_name TEXT, sha256 TEXT, size_bytes INTEGER, error_code TEXT, error_message TEXT,
        saved_ms INTEGER, updated_ms INTEGER NOT NULL,
        PRIMARY KEY (item_id, image_index))""",
    # The downloader takes pending images soonest-to-die first.
    "CREATE INDEX IF NOT EXISTS images_state_deadline ON images (state, deadline_ms)",
    """CREATE TABLE IF NOT EXISTS transitions (
        id INTEGER PRIMARY KEY, item_id TEXT NOT NULL REFERENCES items (item_id),
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, at_ms INTEGER NOT NULL, note TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS transitions_item ON transitions (item_id)",
)

#: The later places of one request in one manifest kept with its item (the first is its ``source``).
MORE_SOURCES_KEPT = 100
# Items met again stay as they are, only marked seen in this run; their place in the manifest may have moved.
# Met again in the same run, the item is a later row asking for the same request: its place is kept too, so
# that every row of the manifest can find its image.
_UPSERT_ITEM = f"""INSERT INTO items (item_id, replica, region, model, n_images, request, source, entry,
    variables, output, price_per_image, currency, planned_ms, updated_ms, first_seen_run, last_seen_run, state)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'planned')
    ON CONFLICT (item_id) DO UPDATE SET
        more_sources = CASE
            WHEN items.last_seen_run < excluded.last_seen_run THEN '[]'
            WHEN items.source = excluded.source OR json_array_length(items.more_sources) >= {MORE_SOURCES_KEPT}
                THEN items.more_sources
            ELSE json_insert(items.more_sources, '$[#]', excluded.source) END,
        source = CASE WHEN items.last_seen_run < excluded.last_seen_run THEN excluded.source ELSE items.source END,
        entry = CASE WHEN items.last_seen_run < excluded.last_seen_run THEN excluded.entry ELSE items.entry END,
        last_seen_run = excluded.last_seen_run"""

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
    # A planned item has no task: it is either new or known to have created none.
    ItemState.planned: ("task_id = NULL", "task_status = NULL", "ended_ms = NULL"),
    # A new attempt, or a task at last: the error that held the item back is history (the audit keeps it).
    ItemState.submitting: ("submit_started_ms = :now", "attempts = attempts + 1", *_CLEAR_ERROR),
    ItemState.queued: ("submitted_ms = :now", *_CLEAR_ERROR),
    ItemState.unknown: (),
}
# Every other state ends the item's life on the service (or its download): the first of them stamps the end.
_ON_ENTRY |= {state: ("ended_ms = COALESCE(ended_ms, :now)",) for state in ItemState if state not in _ON_ENTRY}
#: Columns a caller may set with ``transition`` or ``update``; ``request_id`` is appended to ``request_ids``.
#: The times and ``attempts`` are set on entering a state (``_ON_ENTRY``); a caller may give its own.
_SETTABLE = frozenset(
    {"task_id", "task_status", "error_code", "error_message", "attempts", "cost", "endpoint"}
    | {"submit_started_ms", "submitted_ms", "ended_ms"}
)
_ORDERABLE = frozenset({"seq", "submit_started_ms", "submitted_ms", "updated_ms"})


_ITEM_COLUMNS = ", ".join(f.name for f in fields(ItemRow))
_IMAGE_COLUMNS = ", ".join(f.name for f in fields(ImageRow))


#: Canonical JSON: the same value always gives the same text. One encoder, built once: planning is hot.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
_json = _ENCODER.encode


class Ledger:
    """The run's SQLite ledger. Open with :meth:`open`; use as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Clock) -> None:
        self._conn, self.path, self._clock = conn, path, clock

    @classmethod
    def open(cls, run_dir: Path, *, clock: Clock, create: bool = True) -> Ledger:
        """Open (and with ``create``, make) the ledger of ``run_dir``, checking its schema version."""
        run_dir = Path(run_dir)
        path = run_dir / LEDGER_FILE
        if not create and not path.exists():
            raise LedgerError(f"no ledger in {run_dir}: is this a run folder? (a run creates {LEDGER_FILE})")
        run_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, one transaction per transition.
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        conn.row_factory = sqlite3.Row
        try:
            cls._configure(conn, path)
            ledger = cls(conn, path, clock)
            ledger._migrate()
        except BaseException:
            conn.close()
            raise
        return ledger

    @staticmethod
    def _configure(conn: sqlite3.Connection, path: Path) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise LedgerError(f"{path}: the file system refused WAL mode (got {mode!r}); use a local folder")
        # NORMAL fsyncs only at checkpoints: a commit survives the process being killed, and a power loss can
        # drop only the last ones. Those a POST depends on are made durable one by one (``transition``'s
        # ``durable``): an fsync per image saved would cost the ceiling a third of its speed.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # Planning a million items inserts into the item_id index at random places: keep it in the page cache.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # After a big plan the WAL is as large as the plan; give the disk back once it has been checkpointed.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")

    def _migrate(self) -> None:
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_ms', ?)", (str(self._clock.now_ms()),))
            found = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            if found <= SCHEMA_VERSION:  # a run folder made by an earlier wanbatch: bring it up to date
                columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
                for name, definition in _ADDED_COLUMNS.items():
                    if name not in columns:
                        conn.execute(f"ALTER TABLE items ADD COLUMN {name} {definition}")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                found = SCHEMA_VERSION
        if found != SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: schema version {found}, this wanbatch reads version {SCHEMA_VERSION};"
                " use the wanbatch that created this run folder, or start a new one"
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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

    # ── runs and items ──────────────────────────────────────────────────────────────────────────────

    def begin_run(self) -> int:
        """Start a new run in this folder and return its number (1, 2, ...)."""
        with self._tx() as conn:
            run = conn.execute("SELECT COALESCE(MAX(run), 0) + 1 FROM runs").fetchone()[0]
            conn.execute("INSERT INTO runs VALUES (?, ?, ?)", (run, self._clock.now_ms(), os.getpid()))
        return run

    def add_items(
        self,
        items: Iterable[ItemLike],
        *,
        run: int,
        price_of: Callable[[ItemLike], float] | None = None,
        currency: str = "CNY",
        batch_size: int = 5000,
    ) -> AddResult:
        """Plan the items not yet in the ledger, and mark every item given as seen in ``run``.

        ``items`` is read lazily, ``batch_size`` at a time (INSERT ... ON CONFLICT), so a manifest of any
        size is planned in bounded memory. An item already there keeps its state; only its ``source`` and
        ``entry`` follow the manifest. ``price_of`` gives the price per image, stored with the item so that
        its cost never changes under it.
        """
        source = iter(items)
        # Checkpoints (each an fsync) are held back while planning and done once at the end: about half the
        # time for a big plan. Commits stay as durable as ever; only copying them into the main file waits.
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        try:
            added, existing = self._add_batches(source, run, price_of, currency, batch_size)
        finally:
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return AddResult(added=added, existing=existing)

    def _add_batches(
        self,
        source: Iterator[ItemLike],
        run: int,
        price_of: Callable[[ItemLike], float] | None,
        currency: str,
        batch_size: int,
    ) -> tuple[int, int]:
        added = existing = 0
        more = True
        while more:
            taken = 0
            with self._tx() as conn:
                # A new row always takes seq = MAX(seq) + 1, so the growth of MAX(seq) counts the rows added.
                before = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
                while taken < ROWS_PER_COMMIT:
                    now = self._clock.now_ms()
                    batch = itertools.islice(source, batch_size)
                    rows = [_item_params(item, run, now, price_of, currency) for item in batch]
                    if not rows:
                        more = False
                        break
                    conn.executemany(_UPSERT_ITEM, rows)
                    taken += len(rows)
                new = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0] - before
            added, existing = added + new, existing + taken - new
        return added, existing

    def stale_count(self, run: int) -> int:
        """Items the manifest of ``run`` no longer has; they are left as they are."""
        # A scan, not an index: it runs once per run, and an index here would slow every resume's marking.
        return self._conn.execute("SELECT count(*) FROM items WHERE last_seen_run < ?", (run,)).fetchone()[0]

    def get(self, item_id: str) -> ItemRow:
        row = self._conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemRow.from_row(row)

    def state_of(self, item_id: str) -> ItemState:
        """The item's state alone: one column, for the stages that need nothing else of the row."""
        return self._state_of(self._conn, item_id)

    def item_for_task(self, task_id: str) -> ItemRow | None:
        """The item holding ``task_id``, to match the service's task list against the ledger."""
        row = self._conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else ItemRow.from_row(row)

    def times_unknown(self, item_id: str) -> int:
        """How many of the item's attempts ended with their outcome unknown."""
        sql = "SELECT count(*) FROM transitions WHERE item_id = ? AND to_state = 'unknown'"
        return self._conn.execute(sql, (item_id,)).fetchone()[0]

    def run_span(self, at_ms: int) -> tuple[int, int]:
        """When the run that was going on at ``at_ms`` (our clock) began, and when the next one did (or the end
        of time): the attempts in that span were made by one process, with one key, on one clock."""
        begun = self._conn.execute("SELECT max(started_ms) FROM runs WHERE started_ms <= ?", (at_ms,)).fetchone()[0]
        after = self._conn.execute("SELECT min(started_ms) FROM runs WHERE started_ms > ?", (at_ms,)).fetchone()[0]
        return (begun if begun is not None else 0, after if after is not None else 2**62)

    def recent_tasks(
        self, region: str, limit: int, *, since_ms: int = 0, until_ms: int = 2**62
    ) -> list[tuple[str, int]]:
        """The newest tasks the ledger knows in ``region`` whose attempts began in [``since_ms``, ``until_ms``),
        with when they began (our clock, ms)."""
        # From the audit's end, not the items: in a big run the items with tasks are few among the planned.
        rows = self._conn.execute(
            """SELECT items.task_id, items.submit_started_ms FROM transitions JOIN items USING (item_id)
               WHERE transitions.to_state = 'queued' AND items.region = ? AND items.task_id IS NOT NULL
                 AND items.submit_started_ms >= ? AND items.submit_started_ms < ?
               ORDER BY transitions.id DESC LIMIT ?""",
            (region, since_ms, until_ms, limit * 4),
        ).fetchall()
        return list(dict.fromkeys((task_id, started) for task_id, started in rows))[:limit]

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
        if order_by not in _ORDERABLE:
            raise LedgerError(f"cannot order items by {order_by!r}; choose one of {', '.join(sorted(_ORDERABLE))}")
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
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE state = :state{where} AND {after}"
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

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    def spent_cost(self) -> float:
        """What the service has billed so far: the images every task generated, at the planned price."""
        return float(self._conn.execute("SELECT COALESCE(SUM(cost), 0) FROM items").fetchone()[0])

    # ── state moves ─────────────────────────────────────────────────────────────────────────────────

    def transition(
        self,
        item_id: str,
        to: ItemState,
        *,
        expect: ItemState | None = None,
        note: str = "",
        images: Sequence[ImageRecord] = (),
        durable: bool = False,
        **item_fields: Any,
    ) -> None:
        """Move one item to ``to`` in one committed transaction, refusing any move the table does not allow.

        With ``expect``, the move happens only if the item is still in that state (compare-and-set), so a
        stale caller cannot move an item twice. ``item_fields``: task_id, task_status, error_code,
        error_message, request_id (appended to request_ids). ``images`` are recorded in the same transaction.
        """
        target = ItemState(to)
        if expect is not None:
            check_transition(item_id, ItemState(expect), target)
        assignments, params = _assignments(item_fields)
        now = self._clock.now_ms()
        if durable:
            self._conn.execute("PRAGMA synchronous = FULL")  # read at commit: this one fsyncs the WAL
        try:
            with self._tx() as conn:
                source = ItemState(expect) if expect is not None else self._state_of(conn, item_id)
                self._move(conn, item_id, source, target, note=note, now=now, extra=assignments, params=params)
                if images:
                    self._upsert_images(conn, item_id, images, now)
        finally:
            if durable:
                self._conn.execute("PRAGMA synchronous = NORMAL")

    def _state_of(self, conn: sqlite3.Connection, item_id: str) -> ItemState:
        row = conn.execute("SELECT state FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no item {item_id} in {self.path}")
        return ItemState(row[0])

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
    ) -> None:
        """The compare-and-set update and its audit row; the caller holds the transaction."""
        check_transition(item_id, source, target)
        sets = ", ".join(("state = :target", "updated_ms = :now", *_ON_ENTRY[target], *extra))
        values = {**(params or {}), "item_id": item_id, "source": source, "target": target, "now": now}
        moved = conn.execute(f"UPDATE items SET {sets} WHERE item_id = :item_id AND state = :source", values)
        if moved.rowcount == 0:
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

    def update(self, item_id: str, **item_fields: Any) -> None:
        """Set non-state fields (task_status, error_code, ...; request_id is appended) in one transaction."""
        if "state" in item_fields:
            raise LedgerError("update() does not change state; use transition(), which checks the move")
        assignments, params = _assignments(item_fields)
        if not assignments:
            return
        sets = ", ".join(("updated_ms = :now", *assignments))
        with self._tx() as conn:
            done = conn.execute(
                f"UPDATE items SET {sets} WHERE item_id = :item_id",
                {**params, "item_id": item_id, "now": self._clock.now_ms()},
            )
            if done.rowcount == 0:
                raise LedgerError(f"no item {item_id} in {self.path}")

    # ── images ──────────────────────────────────────────────────────────────────────────────────────

    def record_images(self, item_id: str, images: Sequence[ImageRecord]) -> None:
        """Record a task's results (upsert per index; an image already saved or final is left alone)."""
        with self._tx() as conn:
            self._state_of(conn, item_id)
            self._upsert_images(conn, item_id, images, self._clock.now_ms())

    def _upsert_images(self, conn: sqlite3.Connection, item_id: str, images: Sequence[ImageRecord], now: int) -> None:
        rows = [
            {
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
            for image in images
        ]
        conn.executemany(_UPSERT_IMAGE, rows)
        # Billing counts every image the service produced (it gave a URL), saved in time or not.
        produced = conn.execute(
            "SELECT url IS NOT NULL, actual_prompt FROM images WHERE item_id = ? ORDER BY image_index", (item_id,)
        ).fetchall()
        count = sum(1 for has_url, _ in produced if has_url)
        prompts = [prompt for _, prompt in produced if prompt is not None]
        conn.execute(
            "UPDATE items SET images_generated = :count, cost = price_per_image * :count, actual_prompts = :prompts,"
            " updated_ms = :now WHERE item_id = :item_id",
            {"count": count, "prompts": _json(prompts), "now": now, "item_id": item_id},
        )

    def iter_images(self, states: Collection[ImageState], *, order_by_deadline: bool = True) -> Iterator[ImageRow]:
        """Images in ``states``, streamed in keyset pages: soonest URL death first (none last), else by item."""
        order = ("item_id", "image_index")
        if order_by_deadline:
            order = (f"COALESCE(deadline_ms, {_NO_DEADLINE_MS})", *order)
        keys = ", ".join(order)
        after = ", ".join(f":k{i}" for i in range(len(order)))
        sql = (
            f"SELECT {_IMAGE_COLUMNS}, {keys} FROM images WHERE state = :state AND ({keys}) > ({after})"
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

    def images_of(self, item_id: str) -> list[ImageRow]:
        rows = self._conn.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE item_id = ? ORDER BY image_index", (item_id,)
        ).fetchall()
        return [ImageRow.from_row(row) for row in rows]

    def image_saved(
        self, item_id: str, index: int, *, file_name: str, sha256: str, size_bytes: int, settle: bool = False
    ) -> ItemState | None:
        """Mark one pending image saved, with its file (relative to the run folder) and checksum.

        With ``settle``, the item is settled (:meth:`settle`) in the same transaction: one commit per image
        instead of two. Its new state is returned, or None if it stays as it is.
        """
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = 'saved', file_name = ?, sha256 = ?, size_bytes = ?, saved_ms = ?,"
                " error_code = NULL, error_message = NULL, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'pending'",
                (file_name, sha256, size_bytes, now, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, ImageState.saved)
            return self._settle(conn, item_id, now) if settle else None

    def image_final(
        self, item_id: str, index: int, state: ImageState, *, code: str = "", message: str = "", settle: bool = False
    ) -> ItemState | None:
        """Mark one pending image failed or expired, with the reason; ``settle`` as for :meth:`image_saved`."""
        state = ImageState(state)
        if state not in IMAGE_TRANSITIONS[ImageState.pending] - {ImageState.saved}:
            raise LedgerError(f"image_final() takes failed or expired, not {state}; a saved image needs image_saved()")
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = ?, error_code = ?, error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'pending'",
                (state, code or None, message or None, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, state)
            return self._settle(conn, item_id, now) if settle else None

    def reopen_image(self, item_id: str, index: int, *, reason: str) -> None:
        """A saved image whose file is gone or damaged (found on resume): pending again, to be fetched while its
        URL lives, its item back to generated, in one transaction."""
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = 'pending', file_name = NULL, sha256 = NULL, size_bytes = NULL,"
                " saved_ms = NULL, error_code = 'FileMissing', error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'saved'",
                (reason, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, ImageState.pending)
            if self._state_of(conn, item_id) is ItemState.saved:
                self._move(conn, item_id, ItemState.saved, ItemState.generated, note=reason, now=now)

    def update_image(self, item_id: str, index: int, *, error_code: str | None, error_message: str | None) -> None:
        """Note why a pending image is not saved yet (a download that failed for now); its state stays."""
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET error_code = ?, error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ?",
                (error_code, error_message, self._clock.now_ms(), item_id, index),
            )
            if done.rowcount == 0:
                raise LedgerError(f"no image {index} of item {item_id} in {self.path}")

    def settle(self, item_id: str) -> ItemState | None:
        """Finish a generated item whose images are all final, in one transaction; its new state, or None.

        saved when every image the service produced is saved; expired when any of them died first. Call it
        after each image's end, and on start for generated items (a stop may fall between the two).
        """
        now = self._clock.now_ms()
        with self._tx() as conn:
            return self._settle(conn, item_id, now)

    def _settle(self, conn: sqlite3.Connection, item_id: str, now: int) -> ItemState | None:
        """:meth:`settle` inside the caller's transaction; images first, as most calls end at a pending one."""
        per_state = dict(
            conn.execute("SELECT state, count(*) FROM images WHERE item_id = ? GROUP BY state", (item_id,)).fetchall()
        )
        if per_state.get(ImageState.pending):
            return None
        if per_state.get(ImageState.expired):
            target, note = ItemState.expired, f"{per_state[ImageState.expired]} image(s) expired before saving"
        elif per_state.get(ImageState.saved):
            target, note = ItemState.saved, f"{per_state[ImageState.saved]} image(s) saved"
        else:
            return None
        if self._state_of(conn, item_id) is not ItemState.generated:
            return None
        # An item that lost images says why, like every other item that did not end saved.
        reason = {"error_code": "UrlExpired", "error_message": note} if target is ItemState.expired else {}
        extra, params = _assignments(reason)
        self._move(conn, item_id, ItemState.generated, target, note=note, now=now, extra=extra, params=params)
        return target

    def _refuse_image_move(self, conn: sqlite3.Connection, item_id: str, index: int, target: ImageState) -> None:
        row = conn.execute(
            "SELECT state FROM images WHERE item_id = ? AND image_index = ?", (item_id, index)
        ).fetchone()
        if row is None:
            raise LedgerError(f"no image {index} of item {item_id} in {self.path}")
        raise IllegalTransition(f"image {index} of item {item_id}: illegal move {row[0]} → {target}")

    # ── reporting ───────────────────────────────────────────────────────────────────────────────────

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


def read_meta(run_dir: Path, key: str) -> str | None:
    """One meta value of a run folder's ledger, opened read-only; None when there is no ledger or no such key.

    For a look before a run takes the folder's lock: the value may change before then, so the run that
    relies on it reads it again under the lock.
    """
    path = Path(run_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return None if row is None else row[0]


def _recorded_state(image: ImageRecord) -> ImageState:
    """A task's result is pending (it has a URL to fetch) or failed (the service says so)."""
    state = ImageState(image.state) if image.state else ImageState.pending if image.url else ImageState.failed
    if state is ImageState.failed or (state is ImageState.pending and image.url):
        return state
    raise LedgerError(f"image {image.index}: a result is recorded pending with a url, or failed; got {state}")


def _item_params(
    item: ItemLike, run: int, now: int, price_of: Callable[[ItemLike], float] | None, currency: str
) -> tuple[Any, ...]:
    """The values of ``_UPSERT_ITEM``, in its column order (positional: planning a million items is hot)."""
    return (
        item.item_id,
        item.replica,
        item.region,
        item.model,
        item.n,
        # The manifest's items carry their request's canonical JSON, made for the id: not encoded again.
        getattr(item, "request_json", "") or _json(item.request()),
        item.source or "",
        item.entry or "",
        _json(dict(item.variables)) if item.variables else "{}",
        item.output,
        float(price_of(item)) if price_of else 0.0,
        currency,
        now,
        now,
        run,
        run,
    )


def _assignments(item_fields: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """SET fragments and their parameters for caller-given fields; unknown names are refused."""
    sets: list[str] = []
    params: dict[str, Any] = {}
    for name, value in item_fields.items():
        if name == "request_id":
            if value:
                sets.append("request_ids = json_insert(request_ids, '$[#]', :f_request_id)")
                params["f_request_id"] = value
        elif name in _SETTABLE:
            sets.append(f"{name} = :f_{name}")
            params[f"f_{name}"] = value
        else:
            allowed = ", ".join(sorted(_SETTABLE | {"request_id"}))
            raise LedgerError(f"the ledger has no settable field {name!r}; settable: {allowed}")
    return sets, params
