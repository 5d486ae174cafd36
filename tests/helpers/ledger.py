"""Reading a run's ledger directly, read-only, as an outside observer would (a test, a soak, a second process)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["count_items", "ledger_rows"]


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
