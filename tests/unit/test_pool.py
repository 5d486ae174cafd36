"""Account pools in-process against the simulator over loopback: work spread over accounts, each held to its own
quota, an account in arrears handing its work to the others, and a resume that reconciles each account in its own
task list. Every money check is read from the simulator's billing log."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from helpers.engine import pool_engine_for
from helpers.ledger import crashed_mid_submit
from helpers.manifest import load_manifest, numbered
from helpers.outputs import assert_billed_once_and_saved
from helpers.sim import post_as_the_engine_would
from wanbatch import catalog
from wanbatch.clock import ScaledClock
from wanbatch.engine import Engine, EngineConfig
from wanbatch.errors import ConfigError
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.service.accounts import Account
from wanbatch.sim.config import AccountConfig
from wanbatch.stages.reconcile import ReconcileConfig

FAST = {"speed": 50.0, "durations": {"*": 6.0}, "duration_spread": 0.0}


def sim_accounts(*names: str, refusals: dict[str, str] | None = None) -> tuple[AccountConfig, ...]:
    """Simulated accounts of Beijing, ``name`` with the key ``sk-<name>``, refusing creates where ``refusals`` says."""
    return tuple(
        AccountConfig(name=name, keys={f"sk-{name}": "beijing"}, refusal=(refusals or {}).get(name, ""))
        for name in names
    )


def ledger_accounts(run_dir: Path) -> dict[str, str]:
    """item_id -> the account whose key made its latest attempt, from the ledger."""
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        return {row.item_id: row.account for row in ledger.iter_items(list(ItemState))}


def billed_per_account(sim) -> Counter:
    return Counter(record["account"] for record in sim.billing)


async def test_work_spreads_over_four_accounts_each_within_its_quota(start_sim, tmp_path):
    """Four equal accounts share 40 items: each makes about a quarter of the tasks, the service never refuses one
    for rate or concurrency (no 429), every image is saved, nothing is paid twice, and the ledger names for each
    item the account the service billed."""
    names = ("a1", "a2", "a3", "a4")
    sim = await start_sim(**FAST, accounts=sim_accounts(*names))
    manifest = load_manifest(tmp_path, prompts=numbered(40, "a pooled lantern"))
    report = await pool_engine_for(sim, tmp_path / "run", names).run(manifest)
    assert report["items"]["saved"] == 40
    assert not any(status == 429 for (_, status) in sim.statuses)
    made = Counter(task.account for task in sim.tasks.values())
    assert set(made) == set(names) and min(made.values()) >= 7, made
    assert_billed_once_and_saved(sim, tmp_path / "run")
    by_task = {task.task_id: task.account for task in sim.tasks.values()}
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        rows = list(ledger.iter_items([ItemState.saved]))
    assert all(by_task[row.task_id] == row.account for row in rows)
    assert {name: figures["images_saved"] for name, figures in report["accounts"].items()} == dict(made)
    assert billed_per_account(sim) == made


async def test_an_account_in_arrears_hands_its_planned_work_to_the_others(start_sim, tmp_path):
    """One account of three is in arrears: its first create is refused (nothing made), its lanes stop, and every
    item is made and billed once by the other two; the report names the stopped account; the run is not halted."""
    names = ("good1", "broke", "good2")
    sim = await start_sim(**FAST, accounts=sim_accounts(*names, refusals={"broke": "Arrearage"}))
    manifest = load_manifest(tmp_path, prompts=numbered(12, "a handed-over kite"))
    report = await pool_engine_for(sim, tmp_path / "run", names).run(manifest)
    assert report["items"]["saved"] == 12 and not report["halted"]
    assert "Arrearage" in report["accounts"]["broke"]["blocked"]["wan2.2-t2i-flash"]
    assert billed_per_account(sim).keys() == {"good1", "good2"}
    assert sim.statuses[("create", 400)] == 1  # the probe: one create alone on the refused key, then nothing
    assert_billed_once_and_saved(sim, tmp_path / "run")
    assert "broke" not in set(ledger_accounts(tmp_path / "run").values())


async def test_every_account_in_arrears_halts_the_run(start_sim, tmp_path):
    """When every account of the pool refuses, the run halts with the items still planned, nothing billed."""
    names = ("b1", "b2")
    refusals = dict.fromkeys(names, "Arrearage")
    sim = await start_sim(**FAST, accounts=sim_accounts(*names, refusals=refusals))
    manifest = load_manifest(tmp_path, prompts=numbered(5, "an unpaid drum"))
    report = await pool_engine_for(sim, tmp_path / "run", names).run(manifest)
    assert report["halted"] and report["items"]["planned"] == 5 and sim.billing == []


async def test_a_resume_reconciles_each_account_in_its_own_task_list(start_sim, sim_api_for, tmp_path):
    """Killed while two creates were under way, one on each account: the one of a1 made a task (in a1's list),
    the one of a2 made none, though a task of its very request sits in a1's list. The resume adopts a1's task for
    a1's item and, finding nothing in a2's own list, sends a2's item again: it never takes a1's task for it."""
    sim = await start_sim(**FAST, accounts=sim_accounts("a1", "a2"))
    manifest = load_manifest(tmp_path, prompts=["a doubted bell", "a second doubted bell"])
    run_dir = tmp_path / "run"
    first, second = crashed_mid_submit(run_dir, manifest, sim.clock, endpoint="async")
    with Ledger.open(run_dir, clock=sim.clock, create=False) as ledger:
        for row, account in ((first, "a1"), (second, "a2")):
            ledger.update(row.item_id, account=account)
    api = sim_api_for(sim, key="sk-a1")
    ours = await post_as_the_engine_would(api, first)
    not_a2s = await post_as_the_engine_would(api, second)  # same request, made through a1's key
    config = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0, retry_s=2.0)
    report = await pool_engine_for(sim, run_dir, ("a1", "a2"), reconcile=config).run(manifest)
    assert report["items"]["saved"] == 2 and report["reconciled_adopted"] == 1 and report["reconciled_resent"] == 1
    with Ledger.open(run_dir, clock=sim.clock, create=False) as ledger:
        rows = {row.item_id: row for row in ledger.iter_items([ItemState.saved])}
    assert rows[first.item_id].task_id == ours
    assert rows[second.item_id].task_id != not_a2s


async def test_an_item_in_flight_on_an_account_the_file_no_longer_names_is_refused(start_sim, tmp_path):
    """A resume whose pool lacks the account an item is in flight on stops at start, naming it; nothing is sent.
    So does a run without a pool over a folder whose items are in flight on a pool's account."""
    sim = await start_sim(**FAST, accounts=sim_accounts("a1", "a2"))
    manifest = load_manifest(tmp_path, prompts=["an orphaned flag"])
    run_dir = tmp_path / "run"
    (row,) = crashed_mid_submit(run_dir, manifest, sim.clock, endpoint="async")
    with Ledger.open(run_dir, clock=sim.clock, create=False) as ledger:
        ledger.update(row.item_id, account="gone")
    with pytest.raises(ConfigError, match="account gone, which the accounts file does not name"):
        await pool_engine_for(sim, run_dir, ("a1", "a2")).run(manifest)
    plain = Engine(
        run_dir=run_dir,
        keys={"beijing": "sk-sim-beijing"},
        config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=sim.clock.speed),
        clock=sim.clock,
    )
    with pytest.raises(ConfigError, match="in flight on account\\(s\\) gone of a pool"):
        await plain.run(manifest)
    assert sim.requests["create"] == 0
    with Ledger.open(run_dir, clock=sim.clock, create=False) as ledger:
        assert ledger.state_of(row.item_id) is ItemState.submitting  # not even moved


async def test_an_account_s_raised_quota_takes_more_of_the_work(start_sim, tmp_path):
    """Two accounts, one granted four times the other's rate and concurrency: it takes most of the items, and
    neither account's quota is exceeded (the simulator holds each to its own)."""
    raised = {"wan2.2-t2i-flash": {"submit_rps": 8, "concurrency": 8}}
    accounts = (
        AccountConfig(name="small", keys={"sk-small": "beijing"}),
        AccountConfig(name="big", keys={"sk-big": "beijing"}, quotas=raised),
    )
    sim = await start_sim(**FAST, accounts=accounts)
    manifest = load_manifest(tmp_path, prompts=numbered(60, "a weighted sail"))
    pool = [
        Account(name="small", region="beijing", key="sk-small"),
        Account(name="big", region="beijing", key="sk-big", quotas=raised),
    ]
    report = await pool_engine_for(sim, tmp_path / "run", pool).run(manifest)
    assert report["items"]["saved"] == 60
    assert not any(status == 429 for (_, status) in sim.statuses)
    made = Counter(task.account for task in sim.tasks.values())
    assert made["big"] > 2.5 * made["small"] > 0, made


def test_an_offer_exists_for_the_pooled_model():
    """The model these tests pool is sold in Beijing at the catalog's quota the simulator enforces."""
    offer = catalog.offer("beijing", "wan2.2-t2i-flash")
    assert (offer.submit_rps, offer.concurrency) == (2, 2)
