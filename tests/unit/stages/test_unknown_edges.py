"""Unknown outcomes the task list cannot tell apart by prompt, and resumes that meet half-finished work."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3

from helpers.engine import engine_for
from helpers.ledger import crashed_mid_submit
from helpers.manifest import load_manifest, numbered
from helpers.sim import post_as_the_engine_would
from wanbatch import catalog
from wanbatch.ledger import LEDGER_FILE, Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.stages.reconcile import ReconcileConfig

FAST = {"speed": 100.0, "durations": {"*": 3.0}}
QUICK = ReconcileConfig(request_window_s=5.0, list_lag_s=0.0, retry_s=1.0)


async def test_wan26_unknowns_that_cannot_be_told_apart_are_held_not_guessed(start_sim, sim_api_for, tmp_path):
    """Two wan2.6 creates in doubt at once (the submitter never does this; a hand-made crash does), both made on
    the service: wan2.6 results show no prompt and both fit either request, so neither is guessed: both items are
    held, each naming both tasks, and nothing is sent again."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(
        tmp_path,
        """\
        name: w26
        defaults: {model: wan2.6-t2i, size: "1280*1280", n: 1, prompt_extend: false}
        prompts: [a blue teapot, a green kettle]
        """,
    )
    rows = crashed_mid_submit(tmp_path / "run", manifest, sim.clock)
    for row in rows:  # the POSTs went out; the crash took their answers
        await post_as_the_engine_would(sim_api_for(sim), row)
        await asyncio.sleep(0.05)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"], report["reconciled_held"]) == (0, 0, 2)
    assert sim.requests["create"] == 2 and report["items"]["unknown"] == 2
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        for row in ledger.iter_items([ItemState.unknown]):
            assert row.error_code == "HeldAmbiguous"
            assert all(task_id in row.error_message for task_id in sim.tasks)


async def test_a_lost_sync_answer_is_never_sent_again(start_sim, tmp_path):
    """A wan2.6 sync call whose answer is lost (here: the client stops waiting before the service answers) has
    no task id to find: it ends expired, counted as paid, and the request is not sent a second time."""
    sim = await start_sim(speed=100.0, durations={"*": 20.0})
    manifest = load_manifest(
        tmp_path,
        """\
        name: s
        defaults: {model: wan2.6-t2i, size: "1280*1280", n: 1, prompt_extend: false, sync: true}
        prompts: [a snow globe on a desk]
        """,
    )
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK, sync_timeout_s=0.05).run(manifest)
    assert sim.requests["sync"] == 1 and report["items"]["expired"] == 1
    assert report["failures"]["SyncAnswerLost"]["count"] == 1
    price = catalog.offer("beijing", "wan2.6-t2i").price
    assert report["cost"]["CNY"] == price and report["cost_lost"] == {"CNY": price}  # paid, and counted as lost


async def test_cancel_pending_on_resume_cancels_only_the_waiting_tasks(start_sim, tmp_path):
    """Resumed with cancel_pending after a hard stop, the tasks still waiting are canceled and the running ones
    are followed to the end and saved (the sweep removes exactly the task it canceled)."""
    sim = await start_sim(speed=50.0, durations={"*": 60.0})
    manifest = load_manifest(tmp_path, prompts=numbered(8, "a tin robot"))
    engine = engine_for(sim, tmp_path / "run")
    run = asyncio.create_task(engine.run(manifest))
    while ((await engine.snapshot() or {}).get("counts") or {}).get("queued", 0) < 4:
        await asyncio.sleep(0.005)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    resumed = engine_for(sim, tmp_path / "run")
    resumed.interrupt(cancel_pending=True)
    report = await resumed.run(manifest)
    assert report["canceled_on_service"] == 2 and report["items"]["saved"] == 2
    assert sorted(t.status for t in sim.tasks.values()) == ["CANCELED", "CANCELED", "SUCCEEDED", "SUCCEEDED"]
    assert len(sim.billing) == 2


async def test_sync_calls_run_side_by_side(start_sim, tmp_path):
    """A sync call leaves nothing to tell apart later (a lost answer is never sent again), so wan2.6 sync calls
    are not held back one at a time like its async creates: their times on the service overlap. Under a loaded
    machine a call may arrive early on the fast clock and be refused for rate (429, unbilled) and sent again."""
    sim = await start_sim(speed=50.0, durations={"*": 5.0}, duration_distribution="fixed")
    manifest = load_manifest(
        tmp_path, prompts=numbered(4, "a brass compass"), model="wan2.6-t2i", size="1280*1280", sync=True
    )
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 4 and len(sim.billing) == 4
    refused = sum(n for (endpoint, status), n in sim.statuses.items() if endpoint == "sync" and status == 429)
    assert sim.requests["sync"] == 4 + refused, sim.statuses  # sent again only after a refusal, which costs nothing
    with sqlite3.connect(tmp_path / "run" / LEDGER_FILE) as conn:
        spans = sorted(conn.execute("SELECT submit_started_ms, ended_ms FROM items").fetchall())
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans


async def test_finished_tasks_of_others_are_asked_about_once_while_an_outcome_waits(start_sim, sim_api_for, tmp_path):
    """A create in doubt waits out its grace, the task list swept every second; the account's finished tasks
    that are not ours (another program's) cannot change, so each is queried once, not at every sweep."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=numbered(1, "a copper kettle"))
    (row,) = crashed_mid_submit(tmp_path / "run", manifest, sim.clock)  # a crash before the POST went out
    for i in range(3):  # another program's tasks on the same account and model
        await post_as_the_engine_would(sim_api_for(sim), row, prompt=f"someone else's lamp {i}")
        await asyncio.sleep(0.02)  # two simulated seconds: within the account's rate
    await asyncio.sleep(0.1)  # ten simulated seconds more: they have ended
    window = ReconcileConfig(request_window_s=40.0, list_lag_s=0.0, retry_s=1.0)
    report = await engine_for(sim, tmp_path / "run", reconcile=window).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (0, 1)
    assert report["items"]["saved"] == 1
    # Three foreign tasks once each, and the re-sent item's own looks (a few), over some twenty sweeps.
    assert sim.requests["list"] >= 5 and sim.requests["query"] <= 3 + 4, sim.requests
