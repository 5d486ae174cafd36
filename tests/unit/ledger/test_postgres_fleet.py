"""The PostgreSQL ledger shared by several processes: first use at once, planning at once, racing for the same
items (each moved exactly once), and the tables' version (made, refused when newer, upgraded when asked)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from helpers.paths import REPO
from wanbatch.clock import ScaledClock
from wanbatch.errors import LedgerError
from wanbatch.ledger import pgschema
from wanbatch.ledger.pgschema import SCHEMA_VERSION, SchemaVersionError
from wanbatch.ledger.postgres import PgLedger

WORKERS = 4
ITEMS = 200

#: One worker: opens the batch (the schema's first use, at once with the others), plans the same items, waits
#: until every worker has planned, then moves every item it can from planned to submitting, in its own order.
WORKER = textwrap.dedent(
    """
    import asyncio, dataclasses, json, pathlib, random, sys, time
    from wanbatch.clock import ScaledClock
    from wanbatch.errors import IllegalTransition
    from wanbatch.ledger.postgres import PgLedger
    from wanbatch.ledger.states import ItemState

    @dataclasses.dataclass
    class Item:
        item_id: str
        replica: int = 0
        region: str = "beijing"
        model: str = "wan2.2-t2i-flash"
        n: int = 1
        variables: dict = dataclasses.field(default_factory=dict)
        source: str = "jobs/fleet.yaml:1"
        entry: str = "prompts[0]"
        output: str | None = None

        def request(self):
            return {"prompt": self.item_id, "size": "1024*1024", "n": 1}

    async def main(url, folder, number, workers, count):
        async with await PgLedger.open(url, batch="s3://fleet/batch", clock=ScaledClock()) as ledger:
            planned = await ledger.add_items([Item(f"item-{i:04d}") for i in range(count)], run=1)
            (folder / f"ready-{number}").write_text("")
            deadline = time.monotonic() + 20
            while len(list(folder.glob("ready-*"))) < workers:
                if time.monotonic() > deadline:
                    sys.exit("the other workers never planned")
                time.sleep(0.005)
            order = [f"item-{i:04d}" for i in range(count)]
            random.Random(number).shuffle(order)
            moved = []
            for item_id in order:
                try:
                    await ledger.transition(item_id, ItemState.submitting, expect=ItemState.planned, note=str(number))
                except IllegalTransition:
                    continue
                moved.append(item_id)
        print(json.dumps({"added": planned.added, "moved": moved}))

    asyncio.run(main(sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    """
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``wanbatch`` as a user runs it, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "wanbatch", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


async def version_of(url: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await pgschema.schema_version(conn)


async def set_version(url: str, version: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("UPDATE wanbatch_schema SET version = %s", (version,))


def test_processes_racing_for_the_same_items_move_each_exactly_once(pg_url: str, tmp_path: Path) -> None:
    """Four processes open a new schema at once, plan the same 200 items at once and race each from planned to
    submitting: nothing fails, the items are planned once with positions 1..200, and each is moved by one
    process only, with one audit row."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), pg_url, str(tmp_path), str(number), str(WORKERS), str(ITEMS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for number in range(WORKERS)
    ]
    answers = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        answers.append(json.loads(out))
    assert sum(answer["added"] for answer in answers) == ITEMS
    moved = [item_id for answer in answers for item_id in answer["moved"]]
    assert len(moved) == len(set(moved)) == ITEMS
    # A race, not a queue: more than one process won items.
    assert sum(1 for answer in answers if answer["moved"]) > 1
    with psycopg.connect(pg_url) as conn:
        audit = conn.execute("SELECT item_id, count(*) FROM transitions GROUP BY item_id").fetchall()
        seqs = conn.execute("SELECT array_agg(seq ORDER BY seq) FROM items").fetchone()[0]
        states = conn.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall()
    assert len(audit) == ITEMS and {n for _, n in audit} == {1}
    assert seqs == list(range(1, ITEMS + 1))
    assert states == [("submitting", ITEMS)]


async def test_first_use_by_many_connections_at_once_makes_the_tables_once(pg_url: str) -> None:
    """Eight ledgers opened at once on an empty schema (four batches, two each) all open: the advisory lock lets
    one make the tables while the others wait, then find them."""
    clock = ScaledClock(start_s=1_800_000_000.0)
    outs = [f"/runs/{number % 4}" for number in range(8)]
    ledgers = await asyncio.gather(*(PgLedger.open(pg_url, batch=out, clock=clock, pool_size=1) for out in outs))
    try:
        assert len({ledger.path for ledger in ledgers}) == 4
        assert await version_of(pg_url) == SCHEMA_VERSION
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_tables_of_a_later_wanbatch_are_refused_naming_both_versions(pg_url: str) -> None:
    """A database a later wanbatch has upgraded is refused when opened, by init and by upgrade, saying which
    version it found and which this one supports; it is left as it is."""
    clock = ScaledClock(start_s=1_800_000_000.0)
    await (await PgLedger.open(pg_url, batch="/runs/a", clock=clock)).close()
    await set_version(pg_url, SCHEMA_VERSION + 1)
    later = f"at version {SCHEMA_VERSION + 1}; this wanbatch supports version {SCHEMA_VERSION} at most"
    with pytest.raises(SchemaVersionError, match=later):
        await PgLedger.open(pg_url, batch="/runs/a", clock=clock)
    for action in ("init", "upgrade"):
        done = run_cli("ledger", action, "--ledger", pg_url)
        assert done.returncode == 2 and later in done.stderr, done.stderr
    assert await version_of(pg_url) == SCHEMA_VERSION + 1


async def test_older_tables_are_upgraded_only_when_asked(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables one version behind are refused on open (workers of the older wanbatch may be using them) with the
    command that upgrades them; upgrade runs the missing steps once, keeping every row."""
    clock = ScaledClock(start_s=1_800_000_000.0)
    async with await PgLedger.open(pg_url, batch="/runs/a", clock=clock) as ledger:
        await ledger.set_meta("kept", "yes")
    later = {**pgschema.MIGRATIONS, SCHEMA_VERSION + 1: ("ALTER TABLE items ADD COLUMN colour text",)}
    monkeypatch.setattr(pgschema, "MIGRATIONS", later)
    monkeypatch.setattr(pgschema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match="run `wanbatch ledger upgrade --ledger URL`"):
        await PgLedger.open(pg_url, batch="/runs/a", clock=clock)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert await pgschema.prepare(conn, "here", upgrade=True) == SCHEMA_VERSION
        assert await pgschema.prepare(conn, "here", upgrade=True) == SCHEMA_VERSION + 1
        await conn.execute("SELECT colour FROM items")
    async with await PgLedger.open(pg_url, batch="/runs/a", clock=clock) as ledger:
        assert await ledger.meta("kept") == "yes"


def test_the_ledger_command_makes_the_tables_then_finds_them(pg_url: str) -> None:
    """``wanbatch ledger init`` makes the tables of an empty schema, says so, and finds them the next time;
    ``upgrade`` of tables at this version changes nothing; upgrade of an empty schema points to init."""
    first = run_cli("ledger", "upgrade", "--ledger", pg_url)
    assert first.returncode == 2 and "no wanbatch tables here; `wanbatch ledger init" in first.stderr
    made = run_cli("ledger", "init", "--ledger", pg_url)
    assert made.returncode == 0, made.stderr
    assert f"tables at version {SCHEMA_VERSION} (made)" in made.stdout
    for action in ("init", "upgrade"):
        again = run_cli("ledger", action, "--ledger", pg_url)
        assert again.returncode == 0 and "(already there)" in again.stdout
    assert asyncio.run(version_of(pg_url)) == SCHEMA_VERSION


async def test_opening_without_create_needs_the_tables(pg_url: str) -> None:
    """A ledger opened without ``create`` on an empty schema says the tables are missing and how to make them."""
    with pytest.raises(LedgerError, match="no wanbatch tables here"):
        await PgLedger.open(pg_url, batch="/runs/a", clock=ScaledClock(start_s=1.0), create=False)
    assert await version_of(pg_url) is None
