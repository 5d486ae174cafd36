"""Opening a run folder's ledger as a :class:`~wanbatch.ledger.interface.RunLedger`, whatever stands behind it.

``async with open_ledger(run_dir, clock=clock) as ledger:`` opens the ledger (with ``create``, makes it),
hands it to the block and closes it when the block ends, however it ends. Today that is the SQLite file in
``run_dir`` (:class:`~wanbatch.ledger.sqlite_async.SqliteLedger`); a ledger in a database shared by several
machines is chosen here too, by a keyword naming it, so that no caller knows which it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from wanbatch.clock import Clock
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.sqlite import Ledger
from wanbatch.ledger.sqlite_async import SqliteLedger

__all__ = ["open_ledger"]


@contextlib.asynccontextmanager
async def open_ledger(run_dir: Path, *, clock: Clock, create: bool = True) -> AsyncIterator[RunLedger]:
    """The ledger of ``run_dir`` (made there with ``create``, else :class:`~wanbatch.errors.LedgerError` when it
    has none), its schema checked, open for the block; ``clock`` stamps its rows."""
    with Ledger.open(run_dir, clock=clock, create=create) as sync:
        yield SqliteLedger(sync)
