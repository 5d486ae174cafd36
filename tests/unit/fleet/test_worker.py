"""A fleet worker run in-process on PostgreSQL: a batch of one worker finishes and writes its outputs; a worker
started on the batch with another manifest is refused before anything is sent; a worker unsure of its lease sends
no create."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.run_ledger import FakeItem
from wanbatch.clock import ScaledClock
from wanbatch.errors import ConfigError
from wanbatch.fleet.config import FleetConfig
from wanbatch.fleet.worker import FleetWorker
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.states import ItemState
from wanbatch.stages.intake import OtherManifest
from wanbatch.stages.resume import resume_open


async def test_a_worker_with_another_manifest_is_refused_before_anything_is_sent(
    start_sim, pg_url: str, tmp_path: Path
) -> None:
    """No folder holds a fleet's batch, so its manifest record is read from the database: a worker given another
    manifest for the same --out would mix two datasets in one metadata.jsonl, and is refused, sending nothing."""
    sim = await start_sim(speed=100.0, durations={"*": 2.0})
    first = load_manifest(tmp_path / "a", prompts=numbered(2, "a glass heron"), name="herons")
    report = await engine_for(sim, tmp_path / "out", gallery=False, ledger_url=pg_url).run(first)
    assert report["items"]["saved"] == 2 and (tmp_path / "out" / "report.json").exists()
    assert report["fleet"]["last"] is True and report["fleet"]["taken_over"] == 0
    creates = sim.requests["create"]
    other = load_manifest(tmp_path / "b", prompts=numbered(2, "a paper crane"), name="cranes")
    with pytest.raises(OtherManifest, match="another manifest"):
        await engine_for(sim, tmp_path / "out", gallery=False, ledger_url=pg_url).run(other)
    assert sim.requests["create"] == creates


async def test_a_worker_unsure_of_its_lease_sends_nothing(
    start_sim, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose last heartbeat is half a lease old may have been taken over already (another is then
    reconciling its creates): it sends no create, puts the item it was about to send back to planned, and stops."""
    monkeypatch.setattr(FleetWorker, "may_send", lambda self: False)
    sim = await start_sim(speed=100.0, durations={"*": 2.0})
    manifest = load_manifest(tmp_path, prompts=numbered(3, "a tin owl"))
    report = await engine_for(sim, tmp_path / "out", gallery=False, ledger_url=pg_url).run(manifest)
    assert sim.requests["create"] == 0 and report["submitted"] == 0
    assert report["items_in_manifest"] == {**{state: 0 for state in report["items_in_manifest"]}, "planned": 3}
    # It was moved to submitting (the claim is made before the look at the lease), and back, sending nothing.
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM transitions WHERE note = 'not sent: lease'")
        assert (await cur.fetchone())[0] >= 1


async def test_may_send_holds_for_half_a_lease_after_a_heartbeat(pg_url: str) -> None:
    """may_send is true while the last heartbeat is younger than half the lease, and false after."""
    clock = ScaledClock()
    async with await PgLedger.open(pg_url, batch="s3://fleet/lease", clock=clock, worker="w") as ledger:
        worker = FleetWorker(ledger, clock=clock, config=FleetConfig.for_lease(0.4))
        await worker.join()
        assert worker.may_send()
        await asyncio.sleep(0.25)
        assert not worker.may_send()


async def test_an_item_taken_over_on_an_account_this_worker_has_no_key_of_is_a_clear_error(
    pg_url: str, tmp_path: Path
) -> None:
    """Workers given different accounts files: an item taken over from one, in flight on an account this one has
    no key of, stops it with a message that says what to do, not a KeyError."""
    async with await PgLedger.open(pg_url, batch=tmp_path, clock=ScaledClock(), worker="w") as ledger:
        await ledger.add_items([FakeItem(item_id="x1")], run=1)
        await ledger.transition("x1", ItemState.submitting, expect=ItemState.planned, account="team-z")
        row = await ledger.transition("x1", ItemState.queued, expect=ItemState.submitting, task_id="t-1")
        with pytest.raises(ConfigError, match=r"team-z.*same accounts file"):
            await resume_open(
                ledger, [row], lanes={}, tracker=None, reconciler=None, downloader=None, now_s=0.0, why="taken over"
            )
