"""A run whose ledger suspends around every call, as a database across a network does (SQLite never does): what
the stages keep in order across a ledger call still holds: every image is saved and every item settled, each
request billed once, a create whose answer was lost is reconciled, not sent again."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.outputs import audit
from helpers.run_ledger import SuspendingLedger
from helpers.unkind import sim_with
from wanbatch import engine
from wanbatch.clock import Clock
from wanbatch.ledger import Ledger, RunLedger, open_ledger
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.stages.reconcile import ReconcileConfig


@pytest.fixture
def suspending(monkeypatch: pytest.MonkeyPatch) -> list[SuspendingLedger]:
    """The engine opens its ledgers suspending; the ones it opened, in order."""
    opened: list[SuspendingLedger] = []

    @contextlib.asynccontextmanager
    async def open_suspending(run_dir: Path, *, clock: Clock, create: bool = True) -> AsyncIterator[RunLedger]:
        async with open_ledger(run_dir, clock=clock, create=create) as ledger:
            opened.append(SuspendingLedger(ledger))
            yield opened[-1]

    monkeypatch.setattr(engine, "open_ledger", open_suspending)
    return opened


async def test_a_run_on_a_suspending_ledger_saves_every_image_and_settles_every_item(tmp_path, suspending):
    """Eight items of four images each, saved by eight workers at once: the images of one item end side by side,
    and exactly one of them settles it, though each image's commit gives the loop away."""
    manifest = load_manifest(tmp_path, prompts=numbered(8, "a suspended heron"), n=4, seed=5)
    async with sim_with([], speed=200.0, durations=2.0) as sim:
        report = await engine_for(sim, tmp_path / "run", gallery=False).run(manifest)
    assert suspending and suspending[0].calls > 8 * 4
    assert report["items"]["saved"] == 8 and report["images"]["saved"] == 32, report["items"]
    billed = Counter(record["fingerprint"] for record in sim.billing)  # a record per image billed
    assert len(billed) == 8 and set(billed.values()) == {4}, billed
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert ledger.counts()[ItemState.saved] == 8
        assert len(list(ledger.iter_images([ImageState.saved]))) == 32


async def test_lost_create_answers_on_a_suspending_ledger_are_adopted_and_never_sent_twice(
    start_sim, tmp_path, suspending
):
    """Creates whose answers are lost after the task was made (a reset, a cut body, broken JSON), on two models,
    with a ledger that suspends: each is reconciled and its task adopted, no request is made twice, every item
    is saved."""
    faults = {"reset_after": 0.15, "truncated_body": 0.1, "malformed_json": 0.1}
    sim = await start_sim(speed=100.0, durations={"*": 3.0}, fault_rates=faults, seed=4)
    prompts = numbered(16, "a suspended lantern", models=("wan2.2-t2i-flash", "wanx2.1-t2i-turbo"))
    quick = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0)
    report = await engine_for(sim, tmp_path / "run", reconcile=quick).run(load_manifest(tmp_path, prompts=prompts))
    assert suspending and sum(sim.faults_injected[f] for f in faults) > 0
    assert len(sim.tasks) == 16 and report["reconciled_adopted"] == len(sim.tasks) - report["submitted"] > 0
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 16, result.summary()
