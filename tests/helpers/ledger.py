"""A run's ledger seen from outside: read directly, read-only, as an observer would (a test, a soak, a second
process), or left as a crash would leave it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from wanbatch import catalog
from wanbatch.clock import Clock
from wanbatch.ledger import ItemRow, Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.manifest import Manifest

__all__ = ["count_items", "crashed_mid_submit", "ledger_rows", "reads_outside_writes"]


def ledger_rows(run_dir: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    """Read the run's ledger directly (read-only), as an outside observer would."""
    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count_items(run_dir: Path, where: str = "1") -> int:
    """Items of the run folder matching the SQL condition ``where`` (0 before the ledger exists)."""
    if not (run_dir / "ledger.sqlite").exists():
        return 0
    try:
        return ledger_rows(run_dir, f"SELECT count(*) FROM items WHERE {where}")[0][0]
    except sqlite3.OperationalError:  # the run is still creating its tables
        return 0


def crashed_mid_submit(
    run_dir: Path, manifest: Manifest, clock: Clock, *, endpoint: str | None = None
) -> list[ItemRow]:
    """The ledger a run leaves when killed right after committing ``submitting``: every item of ``manifest``
    planned, then marked submitting (to ``endpoint`` when given) as if its POST were under way; their rows."""
    with Ledger.open(run_dir, clock=clock) as ledger:
        run = ledger.begin_run()
        ledger.add_items(manifest.items(), run=run, price_of=lambda item: catalog.offer(item.region, item.model).price)
        rows = list(ledger.iter_items([ItemState.planned]))
        changes = {"endpoint": endpoint} if endpoint else {}
        return [
            ledger.transition(row.item_id, ItemState.submitting, expect=ItemState.planned, **changes) for row in rows
        ]


def reads_outside_writes(monkeypatch) -> list[str]:
    """A list that fills, as the test runs, with every SELECT that a ledger opened from now on makes outside a
    write of its own (what a stage reads back, as against what a write returns)."""
    reads: list[str] = []
    opened = Ledger.open.__func__

    def traced(cls, *args, **kwargs):
        ledger = opened(cls, *args, **kwargs)
        in_write = False

        def trace(statement: str) -> None:
            nonlocal in_write
            in_write = statement.startswith("BEGIN") or (in_write and not statement.startswith("COMMIT"))
            if not in_write and statement.startswith("SELECT"):
                reads.append(statement)

        ledger._conn.set_trace_callback(trace)
        return ledger

    monkeypatch.setattr(Ledger, "open", classmethod(traced))
    return reads
