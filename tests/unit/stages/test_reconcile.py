"""Reconciling unknown creates against a service that is not kind: late tasks, other programs, odd echoes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from helpers.engine import engine_for
from helpers.ledger import count_items, crashed_mid_submit, ledger_rows, reads_outside_writes
from helpers.manifest import load_manifest, write_manifest
from helpers.proc import start_run, wait_until
from helpers.proc import start_sim as start_sim_process
from helpers.sim import post_as_the_engine_would
from wanbatch.ledger import Ledger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.manifest import Manifest
from wanbatch.sim.config import DEMO_ACCOUNT, AccountConfig
from wanbatch.stages.candidates import echoes_prompt
from wanbatch.stages.reconcile import ReconcileConfig

FAST = {"speed": 100.0, "durations": {"*": 3.0}}
#: A second key of the demo account: another program of the same owner, billed to the same account.
OTHER_KEY = "sk-sim-beijing-other-program"
SHARED_ACCOUNT = (AccountConfig(name=DEMO_ACCOUNT, keys={OTHER_KEY: "beijing"}),)
QUICK = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0, retry_s=1.0)


def crashed(run_dir: Path, manifest: Manifest, clock) -> list[ItemRow]:
    """The ledger a run leaves when killed right after committing ``submitting`` for every item (async creates)."""
    return crashed_mid_submit(run_dir, manifest, clock, endpoint="async")


def known(run_dir: Path, row: ItemRow, task_id: str, clock) -> None:
    """Record ``row`` as queued with ``task_id``: a task the ledger knows (it teaches the engine our key's id)."""
    with Ledger.open(run_dir, clock=clock, create=False) as ledger:
        ledger.transition(row.item_id, ItemState.queued, task_id=task_id)


def test_an_echo_is_matched_allowing_for_truncation_and_white_space():
    """The service may cut a prompt at 500 or 800 characters and fold its white space: both still match ours;
    a different prompt, or a short one that merely begins ours, does not."""
    prompt = "a  red fox\n in snow, " + "x" * 700
    assert echoes_prompt(prompt, prompt)
    assert echoes_prompt(" ".join(prompt.split())[:500], prompt)
    assert echoes_prompt(" ".join(prompt.split())[:800], prompt)
    assert echoes_prompt("a red fox in snow, " + "x" * 600, prompt)
    assert not echoes_prompt("a red fox", prompt)
    assert not echoes_prompt("a red fox in snow, " + "y" * 600, prompt)
    assert not echoes_prompt("", prompt)


async def test_a_lost_create_whose_prompt_is_echoed_at_another_limit_is_adopted(start_sim, sim_api_for, tmp_path):
    """A 600-character prompt on wan2.2-t2i-flash, which the service keeps whole (it cuts at 800, not the 500 the
    catalog says): the lost create is found by its echo and adopted, never sent again."""
    sim = await start_sim(**FAST, prompt_max={"wan2.2-t2i-flash": 800})
    manifest = load_manifest(tmp_path, prompts=["a quiet harbour at dusk, " + "with boats " * 55])
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    assert 500 < len(row.request["prompt"]) <= 800
    await post_as_the_engine_would(sim_api_for(sim), row)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (1, 0)
    assert sim.requests["create"] == 1 and len(sim.billing) == 1 and report["items"]["saved"] == 1


async def test_a_create_that_lands_late_is_adopted_not_sent_again(start_sim, sim_api_for, tmp_path):
    """The gateway holds a create for 200 s before the service makes its task (its window is 300 s): the engine
    does not conclude "no task" before the window has passed, and adopts the task when it appears."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a lighthouse in fog"])
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    engine = engine_for(sim, tmp_path / "run")
    run = asyncio.create_task(engine.run(manifest))

    async def land_late() -> None:
        while sim.clock.now() < row.submit_started_ms / 1000 + 200:
            await asyncio.sleep(0.01)
        await post_as_the_engine_would(sim_api_for(sim), row)

    await land_late()
    report = await run
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (1, 0)
    assert sim.requests["create"] == 1 and len(sim.billing) == 1 and report["items"]["saved"] == 1


async def test_another_programs_task_with_our_prompt_is_not_adopted(start_sim, sim_api_for, tmp_path):
    """Another program on the same account (its own key) sends our prompt and size while our create was lost
    before the service saw it: its task is not ours (another api_key_id), so ours is sent again once the list
    proves it was never made; both are billed once, and our run saves its own."""
    sim = await start_sim(**FAST, accounts=SHARED_ACCOUNT)
    manifest = load_manifest(tmp_path, prompts=["a paper boat on a pond", "a kite over dunes"])
    first, lost = crashed(tmp_path / "run", manifest, sim.clock)
    api = sim_api_for(sim)
    known(tmp_path / "run", first, await post_as_the_engine_would(api, first), sim.clock)
    foreign = await post_as_the_engine_would(api, lost, key=OTHER_KEY)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (0, 1)
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert ledger.get(lost.item_id).task_id not in (None, foreign)
    assert report["items"]["saved"] == 2 and len(sim.billing) == 3


async def test_another_programs_task_of_another_size_is_not_adopted_even_with_our_key(start_sim, sim_api_for, tmp_path):
    """The same key (another program given our key) sends our prompt at another size in our window, and our own
    create was made too: the task whose images are not of our size is not ours; ours is adopted."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a copper weathervane"])
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    api = sim_api_for(sim)
    mine = await post_as_the_engine_would(api, row)
    foreign = await post_as_the_engine_would(api, row, size="768*768", seed=99)  # the newest: the list shows it first
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert report["reconciled_adopted"] == 1 and report["reconciled_resent"] == 0
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert ledger.get(row.item_id).task_id == mine != foreign
    assert sim.requests["create"] == 2 and report["items"]["saved"] == 1


async def test_a_wan26_unknown_is_not_paired_with_another_programs_task(start_sim, sim_api_for, tmp_path):
    """wan2.6 results do not show their prompt. Our create was lost before the service saw it; another program
    of the account made a wan2.6 task of our size meanwhile: it is not adopted (another key), ours is sent again."""
    sim = await start_sim(**FAST, accounts=SHARED_ACCOUNT)
    manifest = load_manifest(tmp_path, prompts=["a glass orchid", "a jade frog"], model="wan2.6-t2i", size="1280*1280")
    first, lost = crashed(tmp_path / "run", manifest, sim.clock)
    api = sim_api_for(sim)
    known(tmp_path / "run", first, await post_as_the_engine_would(api, first), sim.clock)
    await asyncio.sleep(0.05)  # five simulated seconds: within wan2.6's rate of one create a second
    foreign = await post_as_the_engine_would(api, lost, key=OTHER_KEY, prompt="somebody else's orchid")
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (0, 1)
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert ledger.get(lost.item_id).task_id not in (None, foreign)
    assert report["items"]["saved"] == 2


async def test_a_lone_wan26_unknown_is_adopted_once_its_window_has_passed(start_sim, sim_api_for, tmp_path):
    """A wan2.6 create whose answer was lost, the only task of its window: adopted (after the window, since no
    prompt proves it), not sent again."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a silver hare"], model="wan2.6-t2i", size="1280*1280")
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    await post_as_the_engine_would(sim_api_for(sim), row)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (1, 0)
    assert sim.requests["create"] == 1 and len(sim.billing) == 1 and report["items"]["saved"] == 1


async def test_a_5xx_answer_to_a_create_is_an_unknown_outcome_not_a_refusal(start_sim, tmp_path):
    """A 500 or 503 answer to a create may come from a gateway after the task was made: the engine reconciles
    through the list (here no task had been made, so it sends again) instead of re-sending at once."""
    sim = await start_sim(**FAST, fault_rates={"internal_error": 1.0}, fault_endpoints=("create",))

    async def calm_after_the_first_error() -> None:
        while not sim.statuses[("create", 500)]:
            await asyncio.sleep(0)
        sim.set_faults("none")

    calm = asyncio.create_task(calm_after_the_first_error())
    manifest = load_manifest(tmp_path, prompts=["a red balloon"])
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    await calm
    assert report["reconciled_resent"] == 1 and sim.requests["list"] >= 1
    assert report["items"]["saved"] == 1 and len(sim.billing) == 1


async def test_an_item_unknown_twice_is_held_not_sent_a_third_time(start_sim, tmp_path):
    """Every create is reset before the service sees it: the first unknown is proven taskless and sent again;
    the second is held for the user with the evidence; the list proved no task, so the budget counts nothing."""
    sim = await start_sim(**FAST, fault_rates={"reset_before": 1.0}, fault_endpoints=("create",))
    manifest = load_manifest(tmp_path, prompts=["a tin soldier"])
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert sim.requests["create"] == 2 and report["reconciled_resent"] == 1 and report["reconciled_held"] == 1
    assert report["items"]["unknown"] == 1
    assert report["failures"]["HeldUnknownTwice"]["count"] == 1
    assert report["budget"]["committed"] == 0.0


async def test_a_candidate_that_never_finishes_holds_our_item_only_for_a_while(start_sim, sim_api_for, tmp_path):
    """A task of our model that runs for hours sits in our window: it could be ours, so the item waits, but only
    ``undecided_max_s``: then it is held for a later run instead of keeping the batch open for a day."""
    sim = await start_sim(speed=100.0, durations={"*": 20000.0})
    manifest = load_manifest(tmp_path, prompts=["an iron bell"])
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    await post_as_the_engine_would(sim_api_for(sim), row, prompt="someone else's bell")
    config = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0, retry_s=2.0, undecided_max_s=60.0)
    report = await engine_for(sim, tmp_path / "run", reconcile=config).run(manifest)
    assert report["reconciled_held"] == 1 and report["failures"]["HeldUndecided"]["count"] == 1
    assert sim.requests["create"] == 1


def test_a_run_folder_of_the_earlier_schema_is_brought_up_to_date(tmp_path):
    """A ledger made before attempts recorded their endpoint opens, gains the column, and keeps its items."""
    import sqlite3

    from wanbatch.clock import ScaledClock
    from wanbatch.ledger import SCHEMA_VERSION

    clock = ScaledClock()
    manifest = load_manifest(tmp_path, prompts=["a clay pot"])
    crashed(tmp_path / "run", manifest, clock)
    with sqlite3.connect(tmp_path / "run" / "ledger.sqlite") as conn:
        conn.execute("ALTER TABLE items DROP COLUMN endpoint")
        conn.execute("ALTER TABLE items DROP COLUMN account")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with Ledger.open(tmp_path / "run", clock=clock, create=False) as ledger:
        (row,) = ledger.iter_items([ItemState.submitting])
        assert row.endpoint is None and row.account == "" and ledger.meta("schema_version") == str(SCHEMA_VERSION)


def test_a_run_killed_during_a_sync_call_never_sends_it_again(tmp_path):
    """kill -9 while a wan2.6 sync call is held open by the service: the resumed run finds the attempt recorded
    as a sync call, which no task list shows, so it writes the item off as paid and lost (SyncAnswerLost)
    instead of sending it again; the service billed it once."""
    sim = start_sim_process(tmp_path / "sim", speed=20.0, config={"durations": {"*": 60.0}, "duration_spread": 0.0})
    manifest = write_manifest(tmp_path, prompts=["a held sync call"], model="wan2.6-t2i", size="1280*1280")
    out = tmp_path / "run"
    try:
        run = start_run(manifest, out, sim=sim, extra=("--sync",), tag="killed")
        wait_until(lambda: count_items(out, "state = 'submitting'") == 1, what="the sync call under way")
        time.sleep(1.0)  # twenty simulated seconds: the call has reached the service, whose task runs for sixty
        assert run.kill() == -9
        # The held call reached the service before the kill, so its sixty seconds end within this, billed.
        sim.settle(65.0)
        resumed = start_run(manifest, out, sim=sim, extra=("--sync",), tag="resumed")
        assert resumed.wait() == 3, resumed.stderr()[-2000:]
        sim.settle(65.0)  # a call sent again by the resumed run would be billed by now
    finally:
        sim.stop()
    assert len(sim.billing()) == 1, "the sync call was sent again"
    ((state, code, endpoint),) = ledger_rows(out, "SELECT state, error_code, endpoint FROM items")
    assert (state, code, endpoint) == ("expired", "SyncAnswerLost", "sync")


async def test_a_wan26_task_of_another_program_on_our_key_that_looks_like_ours_is_never_guessed(
    start_sim, sim_api_for, tmp_path
):
    """Another program uses our very key, model, size and n inside our lost create's window: a wan2.6 result
    shows no prompt, so nothing tells the two tasks apart. The item is held naming both, never adopted."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a pewter owl"], model="wan2.6-t2i", size="1280*1280")
    (row,) = crashed(tmp_path / "run", manifest, sim.clock)
    api = sim_api_for(sim)
    tasks = {await post_as_the_engine_would(api, row)}
    await asyncio.sleep(0.05)  # five simulated seconds: within wan2.6's rate of one create a second
    tasks.add(await post_as_the_engine_would(api, row, prompt="another program's owl", seed=5))
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_held"], sim.requests["create"]) == (0, 1, 2)
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        held = ledger.get(row.item_id)
    assert held.state is ItemState.unknown and held.error_code == "HeldAmbiguous" and held.task_id is None
    assert all(task_id in held.error_message for task_id in tasks)


async def test_retry_held_sends_an_item_held_as_unknown_twice_once_more(start_sim, tmp_path):
    """An item held after two unknown outcomes with no task is left alone by a plain resume, and sent once more,
    then saved, by a resume with retry_held once the service behaves."""
    sim = await start_sim(**FAST, fault_rates={"reset_before": 1.0}, fault_endpoints=("create",))
    manifest = load_manifest(tmp_path, prompts=["a wax seal"])
    await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    sim.set_faults("none")
    again = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert sim.requests["create"] == 2 and again["items"]["unknown"] == 1
    released = await engine_for(sim, tmp_path / "run", reconcile=QUICK, retry_held=True).run(manifest)
    assert sim.requests["create"] == 3 and released["items"]["saved"] == 1 and len(sim.billing) == 1


async def test_a_create_answered_500_after_its_task_was_made_is_adopted_not_sent_again(start_sim, tmp_path):
    """The gateway answers 500 or 503 to creates whose tasks the service made: each item is adopted from the
    list, none is sent a second time, and every image is saved, paid once."""
    sim = await start_sim(**FAST, fault_rates={"error_after_create": 1.0})
    manifest = load_manifest(tmp_path, prompts=["a bronze gong", "a felt hat", "a tin whistle"])
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert sim.faults_injected["error_after_create"] == 3
    assert (report["reconciled_adopted"], report["reconciled_resent"]) == (3, 0)
    assert sim.requests["create"] == 3 and len(sim.billing) == 3 and report["items"]["saved"] == 3


async def test_an_attempt_is_judged_by_the_key_of_the_run_that_made_it(start_sim, sim_api_for, tmp_path):
    """A run with one key of the account made a task and lost another create's answer; a later run, with
    another key of the account, made a task of its own. The lost attempt is looked for among the first run's
    key's tasks, not the newest run's: its task is adopted, never paid twice."""
    sim = await start_sim(**FAST, accounts=SHARED_ACCOUNT)
    manifest = load_manifest(tmp_path, prompts=["an old map", "a lost compass", "a new lamp"])
    first, lost, fresh = crashed(tmp_path / "run", manifest, sim.clock)
    api = sim_api_for(sim)
    known(tmp_path / "run", first, await post_as_the_engine_would(api, first, key=OTHER_KEY), sim.clock)
    made = await post_as_the_engine_would(api, lost, key=OTHER_KEY)
    await asyncio.sleep(0.05)  # a later run, with the other key
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        ledger.begin_run()
        ledger.transition(fresh.item_id, ItemState.unknown)
        ledger.transition(fresh.item_id, ItemState.planned)
        ledger.transition(fresh.item_id, ItemState.submitting, expect=ItemState.planned, endpoint="async")
        ledger.transition(fresh.item_id, ItemState.queued, task_id=await post_as_the_engine_would(api, fresh))
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert report["reconciled_adopted"] == 1 and sim.requests["create"] == 3
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert ledger.get(lost.item_id).task_id == made
    assert report["items"]["saved"] == 3 and len(sim.billing) == 3


async def test_results_that_show_no_prompt_never_give_one_attempts_task_to_another(start_sim, sim_api_for, tmp_path):
    """Two creates of one legacy model in doubt at once; only the later one made a task, and the service's
    results show no prompt (as some of its answers do): nothing tells whose the task is, so neither item adopts
    it and neither is sent again; both are held for the user naming it, and later creates go one at a time."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a grey heron", "a white egret"])
    _, late = crashed(tmp_path / "run", manifest, sim.clock)
    made = await post_as_the_engine_would(sim_api_for(sim), late)
    sim.state.tasks[made].echo = ""  # its results echo no prompt
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"], sim.requests["create"]) == (0, 0, 1)
    assert report["failures"]["HeldAmbiguous"]["count"] == 2


async def test_a_task_held_as_ambiguous_is_not_adopted_later_by_the_other_attempt_it_fits(
    start_sim, sim_api_for, tmp_path
):
    """As above, but the second attempt's window closes well after the first's: the first is held for the task
    that fits both while the second still waits, and the second, alone then, does not adopt that task either."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a grey heron", "a white egret"])
    early, late = crashed(tmp_path / "run", manifest, sim.clock)
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        ledger.update(late.item_id, submit_started_ms=early.submit_started_ms + 20_000)
    made = await post_as_the_engine_would(sim_api_for(sim), late)
    sim.state.tasks[made].echo = ""  # its results echo no prompt
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert (report["reconciled_adopted"], report["reconciled_resent"], sim.requests["create"]) == (0, 0, 1)
    assert report["failures"]["HeldAmbiguous"]["count"] == 2


async def test_an_unknown_create_older_than_a_task_lives_is_written_off_at_its_claims_price(start_sim, tmp_path):
    """An attempt begun longer ago than a task lives can no longer be found in the list: it is written off as paid
    and lost, at the full price its claim reserved (planned when an image cost 1.0, not the catalog's of today),
    and never sent again."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a forgotten sundial"], n=2)
    with Ledger.open(tmp_path / "run", clock=sim.clock) as ledger:
        ledger.add_items(manifest.items(), run=ledger.begin_run(), price_of=lambda item: 1.0)
        (row,) = ledger.iter_items([ItemState.planned])
        ledger.transition(row.item_id, ItemState.submitting, expect=ItemState.planned, endpoint="async")
    sim.clock.advance(60.0)
    lifetime = ReconcileConfig(request_window_s=5.0, list_lag_s=0.0, retry_s=1.0, task_lifetime_s=30.0)
    report = await engine_for(sim, tmp_path / "run", reconcile=lifetime).run(manifest)
    assert report["items"]["expired"] == 1 and report["failures"]["OutcomeUnknown"]["count"] == 1
    assert report["cost_lost"] == {"CNY": pytest.approx(2 * 1.0)} and sim.requests["create"] == 0


async def test_a_sweep_reads_its_items_in_doubt_together_not_one_by_one(start_sim, sim_api_for, tmp_path, monkeypatch):
    """Three unknown creates, swept every second of a 30 s window against a list of other programs' tasks: each
    sweep reads its items, their runs and the listed tasks' owners in one query each, never one row, run or task
    at a time; and no item is sent twice."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=["a glass float", "a cork float", "a tin float"])
    rows = crashed(tmp_path / "run", manifest, sim.clock)
    for i in range(4):  # another program's tasks on the same account and model: listed at every sweep
        await post_as_the_engine_would(sim_api_for(sim), rows[0], prompt=f"someone else's float {i}")
        await asyncio.sleep(0.02)
    reads = reads_outside_writes(monkeypatch)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert report["reconciled_resent"] == 3 and report["items"]["saved"] == 3 and sim.requests["list"] >= 10
    one_at_a_time = ("FROM items WHERE item_id = ?", "FROM items WHERE task_id = ?", "FROM runs WHERE")
    assert [read for read in reads if any(pattern in read for pattern in one_at_a_time)] == []
    sweeps = [read for read in reads if "WHERE item_id IN" in read]
    assert 10 <= len(sweeps) <= sim.requests["list"], len(sweeps)  # one read of the items per sweep
