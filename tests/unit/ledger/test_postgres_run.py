"""Runs of the engine whose ledger is the PostgreSQL one: the stages, side by side on its pooled connections,
save every image and settle every item, pay each request once, and reconcile creates whose answers were lost."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.unkind import sim_with
from wanbatch import engine
from wanbatch.clock import Clock
from wanbatch.ledger import RunLedger, open_ledger
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.stages.reconcile import ReconcileConfig


@pytest.fixture
def on_postgres(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> list[RunLedger]:
    """The engine opens its ledger in the test's schema (the batch named by its run folder); the ones it opened."""
    opened: list[RunLedger] = []

    @contextlib.asynccontextmanager
    async def open_pg(run_dir: Path, *, clock: Clock, create: bool = True) -> AsyncIterator[RunLedger]:
        async with open_ledger(run_dir, clock=clock, create=create, url=pg_url) as ledger:
            opened.append(ledger)
            yield ledger

    monkeypatch.setattr(engine, "open_ledger", open_pg)
    return opened


async def test_a_run_on_postgres_saves_every_image_and_settles_every_item(
    tmp_path: Path, on_postgres: list[RunLedger], pg_url: str
) -> None:
    """Eight items of four images each, saved by eight workers at once through the pool: each item settles
    once, each image is billed once, and the database holds what the report says."""
    manifest = load_manifest(tmp_path, prompts=numbered(8, "a heron in a database"), n=4, seed=5)
    async with sim_with([], speed=200.0, durations=2.0) as sim:
        report = await engine_for(sim, tmp_path / "run", gallery=False).run(manifest)
        clock = sim.clock
    assert on_postgres and isinstance(on_postgres[0], PgLedger)
    assert report["items"]["saved"] == 8 and report["images"]["saved"] == 32, report["items"]
    billed = Counter(record["fingerprint"] for record in sim.billing)
    assert len(billed) == 8 and set(billed.values()) == {4}, billed
    async with open_ledger(tmp_path / "run", clock=clock, create=False, url=pg_url) as ledger:
        assert (await ledger.counts())[ItemState.saved] == 8
        assert len([image async for image in ledger.iter_images([ImageState.saved])]) == 32


async def test_lost_create_answers_on_postgres_are_adopted_and_never_sent_twice(
    start_sim, tmp_path: Path, on_postgres: list[RunLedger]
) -> None:
    """Creates whose answers are lost after the task was made, on two models: each is reconciled from the
    ledger's record and its task adopted, no request is made twice, every item is saved."""
    faults = {"reset_after": 0.15, "truncated_body": 0.1, "malformed_json": 0.1}
    sim = await start_sim(speed=100.0, durations={"*": 3.0}, fault_rates=faults, seed=4)
    prompts = numbered(16, "a lantern in a database", models=("wan2.2-t2i-flash", "wanx2.1-t2i-turbo"))
    quick = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0)
    report = await engine_for(sim, tmp_path / "run", reconcile=quick).run(load_manifest(tmp_path, prompts=prompts))
    assert on_postgres and sum(sim.faults_injected[f] for f in faults) > 0
    assert len(sim.tasks) == 16 and report["reconciled_adopted"] == len(sim.tasks) - report["submitted"] > 0
    billed = Counter(record["fingerprint"] for record in sim.billing)
    assert len(billed) == 16 and set(billed.values()) == {1}, billed
    assert report["items"]["saved"] == 16, report["items"]
