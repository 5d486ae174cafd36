"""The SQLite ledger's file: its tables, its pragmas, and how an older file is brought up to date.

One file, ``ledger.sqlite``, in the run folder, in WAL mode. ``synchronous=NORMAL`` is the rule: a commit
survives the process being killed, and a power loss can only undo the last ones back to a state a resume
heals. The commits a request is sent on the strength of are made durable one at a time by the ledger that
makes them (``synchronous=FULL`` for that commit: see ``Ledger.transition``'s ``durable``).

A ledger made by an earlier wanbatch gains the columns added since (:data:`ADDED_COLUMNS`) when it is
opened; one made by a later wanbatch (a higher :data:`SCHEMA_VERSION`) is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from wanbatch.errors import LedgerError
from wanbatch.ledger.states import ImageState, ItemState

__all__ = [
    "ADDED_COLUMNS",
    "BUSY_TIMEOUT_S",
    "CHECKPOINT_PAGES",
    "LEDGER_FILE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "configure",
    "connect",
    "migrate",
]

LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = 3
#: Columns added to ``items`` since version 1, with their definitions: an older ledger gains them when opened.
#: ``account`` (version 3): the pool's account whose key made the latest attempt; '' for the environment's key.
ADDED_COLUMNS = {
    "endpoint": "TEXT",
    "more_sources": "TEXT NOT NULL DEFAULT '[]'",
    "account": "TEXT NOT NULL DEFAULT ''",
}
#: How long a writer waits for another connection's write lock (``wanbatch status`` reads while a run writes).
BUSY_TIMEOUT_S = 10.0
CACHE_KIB = 64 * 1024
WAL_LIMIT_BYTES = 64 * 1024 * 1024
CHECKPOINT_PAGES = 1000  #: SQLite's default, restored after planning

_STATES_SQL = ", ".join(f"'{s}'" for s in ItemState)
_IMAGE_STATES_SQL = ", ".join(f"'{s}'" for s in ImageState)

SCHEMA = (
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
        endpoint TEXT, more_sources TEXT NOT NULL DEFAULT '[]', account TEXT NOT NULL DEFAULT '')""",
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


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the ledger file ``path``, configured (:func:`configure`), rows readable by name."""
    # isolation_level=None: the ledger issues BEGIN IMMEDIATE / COMMIT itself, one transaction per move.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    conn.row_factory = sqlite3.Row
    try:
        configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def configure(conn: sqlite3.Connection, path: Path) -> None:
    """The pragmas of every connection: WAL, NORMAL sync, foreign keys, a cache for planning, a WAL limit."""
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


def migrate(conn: sqlite3.Connection, path: Path, *, now_ms: int) -> None:
    """Make the tables (a new file) or bring an older file up to :data:`SCHEMA_VERSION`, in one transaction;
    a file of a later version is refused, unchanged."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_ms', ?)", (str(now_ms),))
        found = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if found <= SCHEMA_VERSION:  # a run folder made by an earlier wanbatch: bring it up to date
            columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
            for name, definition in ADDED_COLUMNS.items():
                if name not in columns:
                    conn.execute(f"ALTER TABLE items ADD COLUMN {name} {definition}")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            found = SCHEMA_VERSION
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if found != SCHEMA_VERSION:
        raise LedgerError(
            f"{path}: schema version {found}, this wanbatch reads version {SCHEMA_VERSION};"
            " use the wanbatch that created this run folder, or start a new one"
        )
