"""``wanbatch ledger init|upgrade --ledger URL``: make or upgrade the tables of a PostgreSQL ledger.

A run makes the tables at first use by itself; ``init`` makes them ahead of the workers (and says what is
there), ``upgrade`` brings tables of an earlier wanbatch to this one's version once its workers have stopped.
Both are safe to run while other processes start (the schema's advisory lock).
"""

from __future__ import annotations

import argparse
import asyncio

from wanbatch.errors import ConfigError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's arguments: what to do, and the database."""
    parser.add_argument("action", choices=("init", "upgrade"), help="init: make the tables; upgrade: bring them up")
    parser.add_argument(
        "--ledger",
        required=True,
        metavar="URL",
        help="the database, as a libpq URL (postgresql://user@host/db, ?options=-csearch_path%%3Dschema for a schema)",
    )


def run(args: argparse.Namespace) -> int:
    """Make or upgrade the tables; print what was there and what is now."""
    try:
        from wanbatch.ledger import pgschema, postgres
    except ImportError as exc:  # psycopg is an extra
        needed = "a PostgreSQL ledger needs the postgres extra: pip install 'wanbatch[postgres]'"
        raise ConfigError(f"{needed} ({exc})") from None
    where = postgres.address(args.ledger)

    async def act() -> int:
        async with await postgres.connect(args.ledger) as conn:
            upgrading = args.action == "upgrade"
            return await pgschema.prepare(conn, where, create=not upgrading, upgrade=upgrading)

    found = asyncio.run(act())
    now = pgschema.SCHEMA_VERSION
    done = "made" if found == 0 else "already there" if found == now else f"upgraded from version {found}"
    print(f"{where}: wanbatch ledger tables at version {now} ({done})")
    return 0
