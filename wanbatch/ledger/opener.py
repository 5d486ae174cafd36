"""Opening a run folder's ledger as a :class:`~wanbatch.ledger.interface.RunLedger`, whatever stands behind it.

``async with open_ledger(run_dir, clock=clock) as ledger:`` opens the ledger (with ``create``, makes it),
hands it to the block and closes it when the block ends, however it ends. By default that is the SQLite file in
``run_dir`` (:class:`~wanbatch.ledger.sqlite_async.SqliteLedger`); with ``url="postgresql://..."`` it is a batch
of a PostgreSQL database that several machines may share (:class:`~wanbatch.ledger.postgres.PgLedger`), named
by ``batch``, the run's output location, so that no caller knows which it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from wanbatch.clock import Clock
from wanbatch.errors import ConfigError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.sqlite import Ledger
from wanbatch.ledger.sqlite_async import SqliteLedger

__all__ = ["POSTGRES_SCHEMES", "open_ledger"]

#: How a PostgreSQL ledger's URL begins (libpq takes both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@contextlib.asynccontextmanager
async def open_ledger(
    run_dir: Path,
    *,
    clock: Clock,
    create: bool = True,
    url: str | None = None,
    batch: str | Path | None = None,
    worker: str | None = None,
) -> AsyncIterator[RunLedger]:
    """The ledger of ``run_dir`` (made there with ``create``, else :class:`~wanbatch.errors.LedgerError` when it
    has none), its schema checked, open for the block; ``clock`` stamps its rows. With ``url``, the batch
    ``batch`` (default: ``run_dir``) of the PostgreSQL database there instead, made at first use with ``create``,
    for the worker named ``worker`` (:mod:`wanbatch.fleet`; None: a reader, which sees every item)."""
    if url is None:
        with Ledger.open(run_dir, clock=clock, create=create) as sync:
            yield SqliteLedger(sync)
        return
    if not url.startswith(POSTGRES_SCHEMES):
        raise ConfigError(f"ledger {url!r}: not a database this wanbatch knows; give a postgresql:// URL")
    try:
        from wanbatch.ledger.postgres import PgLedger  # psycopg is an extra, imported for a database only
    except ImportError as exc:
        raise ConfigError(
            f"a PostgreSQL ledger needs the postgres extra: pip install 'wanbatch[postgres]' ({exc})"
        ) from None
    where = run_dir if batch is None else batch
    async with await PgLedger.open(url, batch=where, clock=clock, create=create, worker=worker) as pg:
        yield pg
