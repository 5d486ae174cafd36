"""The durable ledger of a run: every item, image and state move, in SQLite.

One file, ``ledger.sqlite``, in the run folder (its tables and pragmas: :mod:`wanbatch.ledger.schema`).
Every state transition is one committed transaction, made *before* the network action that depends on it,
so that a run killed at any instant can be resumed from here with nothing lost and nothing paid twice (see
the money rules in shared/DESIGN.md).

The stages see it through the async :class:`wanbatch.ledger.interface.RunLedger`, as
:class:`wanbatch.ledger.sqlite_async.SqliteLedger`, so that a database shared by several machines can stand
behind them instead; this class stays synchronous, for what reads a SQLite file as such.

A commit that a request is sent on the strength of (``durable=True``: the ``submitting`` move before a POST,
a sync answer's results) is fsynced before it returns (WAL with ``synchronous=FULL`` for that commit), so it
survives a power loss too; the others survive a crash of the process (WAL, ``synchronous=NORMAL``), and a
power loss can only undo them back to a state a resume heals (a task found again in the list, an image
fetched again). Calls are short, so the engine makes
them from the event loop directly, from one thread (see :mod:`wanbatch.ledger.sqlite_async`).

The class is built in layers, each a module: :mod:`~wanbatch.ledger.reads` (queries),
:mod:`~wanbatch.ledger.moves` (item transitions), :mod:`~wanbatch.ledger.images` (image moves), and here
opening, runs, planning and meta values.

The ledger is never given an API key and has no column that could hold one.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from wanbatch.clock import Clock
from wanbatch.errors import LedgerError
from wanbatch.ledger.images import ImageMoves
from wanbatch.ledger.moves import item_values
from wanbatch.ledger.records import AddResult, ItemLike
from wanbatch.ledger.schema import BUSY_TIMEOUT_S, CHECKPOINT_PAGES, LEDGER_FILE, SCHEMA_VERSION, connect, migrate

__all__ = ["LEDGER_FILE", "MORE_SOURCES_KEPT", "SCHEMA_VERSION", "Ledger", "read_meta"]

#: Planning commits this many items at a time: each commit rewrites every index page it touched, and item
#: ids land at random places in their index, so fewer, larger commits cost much less. Losing an uncommitted
#: part of a plan costs nothing: planning sends nothing, and the next run plans it again.
ROWS_PER_COMMIT = 50_000
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


class Ledger(ImageMoves):
    """The run's SQLite ledger. Open with :meth:`open`; use as a context manager."""

    @classmethod
    def open(cls, run_dir: Path, *, clock: Clock, create: bool = True) -> Ledger:
        """Open (and with ``create``, make) the ledger of ``run_dir``, checking its schema version."""
        run_dir = Path(run_dir)
        path = run_dir / LEDGER_FILE
        if not create and not path.exists():
            raise LedgerError(f"no ledger in {run_dir}: is this a run folder? (a run creates {LEDGER_FILE})")
        run_dir.mkdir(parents=True, exist_ok=True)
        conn = connect(path)
        try:
            migrate(conn, path, now_ms=clock.now_ms())
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, clock)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))


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


def _item_params(
    item: ItemLike, run: int, now: int, price_of: Callable[[ItemLike], float] | None, currency: str
) -> tuple[Any, ...]:
    """The values of ``_UPSERT_ITEM``, in its column order (positional: planning a million items is hot)."""
    return (*item_values(item, price_of, currency), now, now, run, run)
