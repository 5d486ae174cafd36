"""The PostgreSQL ledger's tables, and how wanbatch makes and upgrades them itself.

One database (and schema: the connection's ``search_path``, e.g. ``?options=-csearch_path%3Dname``) holds
any number of batches. A batch is named by its output location (an absolute folder or a URL: see
:func:`batch_key`) in ``batches``; every other table carries its ``batch_id``. The tables mirror the SQLite
ledger's (:mod:`wanbatch.ledger.schema`) and add what several workers sharing one batch will need: who holds
an item (``owner``), which account made its current task (``account``), ``workers``, and an account's quota
shared among them (``lanes``, ``places``).

The version is one row, ``wanbatch_schema(version)``. :func:`prepare` makes the tables at first use, refuses a
database of a later version (it names both) and one of an earlier version (``wanbatch ledger upgrade`` brings it
up: workers of the older wanbatch may still be using it, so it is not changed under them unasked). Making and
upgrading run under a transaction-level advisory lock, so several processes starting at once do not collide.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from wanbatch.errors import LedgerError
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SchemaVersionError", "batch_key", "prepare", "schema_version"]

_STATES_SQL = ", ".join(f"'{s}'" for s in ItemState)
_IMAGE_STATES_SQL = ", ".join(f"'{s}'" for s in ImageState)

#: The statements that bring a database from version ``v - 1`` to ``v``, for each ``v``; version 1 makes all.
#: Item ids are compared byte by byte (``COLLATE "C"``): the same order as SQLite's, whatever the database's
#: collation, and cheaper to index.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE batches (
            batch_id serial PRIMARY KEY,
            out text NOT NULL UNIQUE,
            created_ms bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE meta (
            batch_id integer NOT NULL REFERENCES batches ON DELETE CASCADE,
            key text NOT NULL, value text NOT NULL,
            PRIMARY KEY (batch_id, key))""",
        """CREATE TABLE runs (
            batch_id integer NOT NULL REFERENCES batches ON DELETE CASCADE,
            run integer NOT NULL, started_ms bigint NOT NULL, pid integer NOT NULL, host text NOT NULL DEFAULT '',
            PRIMARY KEY (batch_id, run))""",
        # The processes working on a batch (wanbatch.fleet.members): heartbeat_ms and ended_ms on the database's
        # clock; lease_ms, how long it may be silent before it is taken for dead (its own --lease); taken_by, the
        # worker that took over its items once it was silent past its lease.
        """CREATE TABLE workers (
            batch_id integer NOT NULL REFERENCES batches ON DELETE CASCADE,
            worker_id text NOT NULL, host text NOT NULL, pid integer NOT NULL, run integer,
            started_ms bigint NOT NULL, heartbeat_ms bigint NOT NULL, lease_ms bigint NOT NULL,
            ended_ms bigint, taken_by text,
            PRIMARY KEY (batch_id, worker_id))""",
        # An account's quota shared by every worker (wanbatch.fleet.shared): the next send slot of each account
        # and model (the database's clock), and a row per claim holding one of its places.
        """CREATE TABLE lanes (
            lane text NOT NULL, model text NOT NULL, next_ms bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (lane, model))""",
        """CREATE TABLE places (
            batch_id integer NOT NULL REFERENCES batches ON DELETE CASCADE,
            item_id text COLLATE "C" NOT NULL, lane text NOT NULL, model text NOT NULL,
            worker_id text NOT NULL, price double precision NOT NULL,
            PRIMARY KEY (batch_id, item_id))""",
        "CREATE INDEX places_lane ON places (lane, model)",
        # seq is the item's place in the batch's manifest, 1, 2, ... without gaps: a sharded folder names its
        # subfolders after it, so it is given by the planner (under the batch's lock), not by a sequence.
        f"""CREATE TABLE items (
            batch_id integer NOT NULL REFERENCES batches ON DELETE CASCADE,
            seq bigint NOT NULL,
            item_id text COLLATE "C" NOT NULL,
            state text NOT NULL CHECK (state IN ({_STATES_SQL})),
            replica integer NOT NULL, region text NOT NULL, model text NOT NULL, n_images integer NOT NULL,
            request jsonb NOT NULL, source text NOT NULL, entry text NOT NULL, variables jsonb NOT NULL,
            output text, price_per_image double precision NOT NULL, currency text NOT NULL,
            task_id text, request_ids jsonb NOT NULL DEFAULT '[]', task_status text,
            error_code text, error_message text, attempts integer NOT NULL DEFAULT 0,
            actual_prompts jsonb NOT NULL DEFAULT '[]', images_generated integer NOT NULL DEFAULT 0,
            cost double precision NOT NULL DEFAULT 0,
            planned_ms bigint NOT NULL, submit_started_ms bigint, submitted_ms bigint, ended_ms bigint,
            updated_ms bigint NOT NULL, first_seen_run integer NOT NULL, last_seen_run integer NOT NULL,
            endpoint text, more_sources jsonb NOT NULL DEFAULT '[]',
            owner text, account text NOT NULL DEFAULT '',
            PRIMARY KEY (batch_id, item_id),
            UNIQUE (batch_id, seq))""",
        # (batch, state, seq) serves "the next planned items in manifest order" and the counts per state.
        "CREATE INDEX items_state_seq ON items (batch_id, state, seq)",
        "CREATE INDEX items_task_id ON items (batch_id, task_id) WHERE task_id IS NOT NULL",
        f"""CREATE TABLE images (
            batch_id integer NOT NULL,
            item_id text COLLATE "C" NOT NULL,
            image_index integer NOT NULL,
            state text NOT NULL CHECK (state IN ({_IMAGE_STATES_SQL})),
            url text, deadline_ms bigint, seed bigint, actual_prompt text,
            file_name text, sha256 text, size_bytes bigint, error_code text, error_message text,
            saved_ms bigint, updated_ms bigint NOT NULL,
            PRIMARY KEY (batch_id, item_id, image_index),
            FOREIGN KEY (batch_id, item_id) REFERENCES items ON DELETE CASCADE)""",
        # The downloader takes pending images soonest-to-die first.
        "CREATE INDEX images_state_deadline ON images (batch_id, state, deadline_ms)",
        """CREATE TABLE transitions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            batch_id integer NOT NULL,
            item_id text COLLATE "C" NOT NULL,
            from_state text NOT NULL, to_state text NOT NULL, at_ms bigint NOT NULL, note text NOT NULL,
            FOREIGN KEY (batch_id, item_id) REFERENCES items ON DELETE CASCADE)""",
        "CREATE INDEX transitions_item ON transitions (batch_id, item_id)",
        # The reconciler reads the newest queued moves of a batch.
        "CREATE INDEX transitions_to_state ON transitions (batch_id, to_state, id)",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)

# One lock per schema: batches in other schemas of the same database do not wait for each other.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('wanbatch schema ' || current_schema()))"


class SchemaVersionError(LedgerError):
    """The database's tables are of another version than this wanbatch's."""


def batch_key(out: str | Path) -> str:
    """The name of a batch in the database: its output location, an absolute folder or a URL (no trailing ``/``),
    so that the same ``--out`` given another way (relative, with a ``/``) finds the same batch."""
    text = str(out)
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


async def schema_version(conn: psycopg.AsyncConnection) -> int | None:
    """The version of the tables in the connection's schema; None when there are none."""
    cur = await conn.execute("SELECT to_regclass('wanbatch_schema') IS NOT NULL, current_schema()")
    exists, schema = await cur.fetchone()
    if schema is None:
        raise LedgerError(
            "the connection's search_path names no schema that exists; create it first (CREATE SCHEMA name)"
            " or name one that does (?options=-csearch_path%3Dname)"
        )
    if not exists:
        return None
    cur = await conn.execute("SELECT max(version) FROM wanbatch_schema")
    return (await cur.fetchone())[0]


async def prepare(conn: psycopg.AsyncConnection, where: str, *, create: bool = True, upgrade: bool = False) -> int:
    """Make the tables at first use (``create``), bring older ones up to :data:`SCHEMA_VERSION` (``upgrade``),
    and refuse any other version; returns the version found before. ``conn`` is in autocommit mode; the work
    is one transaction under the schema's advisory lock."""
    async with conn.transaction():
        await conn.execute(_LOCK)
        found = await schema_version(conn)
        if found is None and not create:
            raise LedgerError(f"{where}: no wanbatch tables here; `wanbatch ledger init --ledger URL` makes them")
        start = 0 if found is None else found
        if start > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where}: the ledger's tables are at version {start}; this wanbatch supports version"
                f" {SCHEMA_VERSION} at most: use the wanbatch that upgraded them"
            )
        if 0 < start < SCHEMA_VERSION and not upgrade:
            raise SchemaVersionError(
                f"{where}: the ledger's tables are at version {start}; this wanbatch needs version {SCHEMA_VERSION}:"
                " stop the workers of the older wanbatch, then run `wanbatch ledger upgrade --ledger URL`"
            )
        if found is None:
            await conn.execute("CREATE TABLE wanbatch_schema (version integer NOT NULL)")
            await conn.execute("CREATE UNIQUE INDEX wanbatch_schema_one_row ON wanbatch_schema ((true))")
            await conn.execute("INSERT INTO wanbatch_schema VALUES (0)")
        for version in range(start + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute("UPDATE wanbatch_schema SET version = %s", (version,))
    return start
