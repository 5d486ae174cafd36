"""Nothing lost, nothing paid twice: runs killed at random under injected faults, and unknown create outcomes.

The first test drives real processes (``wanbatch sim --faults chaos`` and
``wanbatch run``, killed with SIGKILL at random moments and resumed) and
checks the run folder against the simulator's billing log. The others run the
engine in-process against the simulator to pin down one way of losing a
create's answer each: a reset or a broken body after the task was made, an
answer held past the client's timeout, a crash on either side of the POST.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from helpers.engine import engine_for
from helpers.ledger import count_items, crashed_mid_submit, ledger_rows
from helpers.manifest import load_manifest, numbered, write_manifest
from helpers.outputs import audit
from helpers.proc import start_run, start_sim, wait_until
from helpers.sim import post_as_the_engine_would
from wanbatch.clock import ScaledClock
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.manifest import Manifest
from wanbatch.stages.reconcile import ReconcileConfig

MODELS = ("wan2.2-t2i-flash", "wanx2.1-t2i-turbo")
FAST = {"speed": 100.0, "durations": {"*": 3.0}}

# --- runs killed at random moments ----------------------------------------------------------------

CHAOS_ITEMS = 240
CHAOS_KILLS = 4
CHAOS_SPEED = 100.0
CHAOS_DURATION_S = 3.0
IN_FLIGHT = "state IN ('submitting', 'queued', 'generated', 'unknown')"
SAVED = "state = 'saved'"


def kill_points(rng: random.Random, kills: int, items: int) -> list[int]:
    """How many items are saved when each kill comes: one random point in each of ``kills`` equal bands of the
    first three quarters of the work, so the kills fall at random moments however fast the engine is."""
    return [int((band + rng.random()) / kills * 0.75 * items) for band in range(kills)]


def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(tmp_path):
    """Killed four times at random moments under chaos faults and resumed, the run saves every billed image
    (a valid PNG, in metadata.jsonl with its task_id and image_index), pays no request twice, and ends every
    item in a final state with a reason."""
    rng = random.Random(2024)
    sim = start_sim(
        tmp_path / "sim", speed=CHAOS_SPEED, faults="chaos", seed=11, config={"durations": {"*": CHAOS_DURATION_S}}
    )
    manifest = write_manifest(tmp_path, prompts=numbered(CHAOS_ITEMS, "chaos", models=MODELS))
    out = tmp_path / "run"
    open_at_kill = []
    try:
        for saved in kill_points(rng, CHAOS_KILLS, CHAOS_ITEMS):
            run = start_run(manifest, out, sim=sim, tag="killed")
            wait_until(
                lambda saved=saved, run=run: count_items(out, SAVED) >= saved or run.proc.poll() is not None,
                what=f"{saved} items saved",
            )
            time.sleep(rng.uniform(0.0, 0.05))  # a random phase within the work, not just after a save
            assert run.proc.poll() is None, f"the run ended before its kill:\n{run.stderr()[-3000:]}"
            open_at_kill.append(count_items(out, IN_FLIGHT))
            assert run.kill() == -9
        final = start_run(manifest, out, sim=sim, tag="final")
        code = final.wait(180)
        # A task made by a create whose answer was lost, and never adopted, would end and be billed now.
        sim.settle(5 * CHAOS_DURATION_S)
    finally:
        sim.stop()
    logs = "".join(path.read_text(encoding="utf-8") for path in (tmp_path / "logs").glob("*.stderr"))
    assert "outcome unknown" in logs and "↻" in logs, "no fault reached the engine: the test proved nothing"
    assert max(open_at_kill) > 0, f"no kill caught work in flight: {open_at_kill}"
    result = audit(out, sim.billing())
    problems = [
        *([f"the resumed run exited {code}: {final.stdout()}"] if code not in (0, 3) else []),
        *(f"billed twice: request {fingerprint}" for fingerprint in result.duplicates),
        *(f"lost: {lost}" for lost in result.lost),
        *(f"not final: {item}" for item in result.open_items),
        *(f"no reason: {item}" for item in result.unexplained),
    ]
    assert problems == [], f"{result.summary()}\n" + "\n".join(problems[:20])
    # An item whose creates went unknown twice, with no task either time, is held for the user, unpaid.
    assert result.billed == result.saved == result.items["saved"] >= CHAOS_ITEMS * 0.95
    assert result.items["saved"] + result.items["unknown"] == CHAOS_ITEMS
    assert len(ledger_rows(out, "SELECT run FROM runs")) == CHAOS_KILLS + 1


# --- unknown outcomes, in-process -----------------------------------------------------------------

#: The windows in which a lost create's task may still appear, cut from the real service's minutes (300 s, then
#: 120 s more in the list) to what this simulator needs: it makes and lists a task at once (these tests inject no
#: late create and no list lag), so the shorter wait reaches the same decisions in a tenth of the time.
QUICK = ReconcileConfig(request_window_s=30.0, list_lag_s=10.0)


def manifest_of(tmp_path: Path, count: int, tag: str, models: tuple[str, ...] = MODELS) -> Manifest:
    return load_manifest(tmp_path, file_name=f"{tag}.yaml", name=tag, prompts=numbered(count, tag, models=models))


async def test_every_create_whose_answer_was_lost_is_adopted_not_resent(start_sim, tmp_path):
    """Creates answered by a reset, a truncated body or broken JSON after the task was made: each task is adopted
    from the list during the run, none is made twice, and every item is saved."""
    faults = {"reset_after": 0.15, "truncated_body": 0.1, "malformed_json": 0.1}
    sim = await start_sim(**FAST, fault_rates=faults, seed=4)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest_of(tmp_path, 30, "lost"))
    lost_answers = len(sim.tasks) - report["submitted"]
    assert sum(sim.faults_injected[f] for f in faults) > 0 and lost_answers > 0
    assert len(sim.tasks) == 30, "a create was sent again although its task existed"
    # (a fault can also hide a 429 behind a reset: then the list proves no task and the item goes again)
    assert report["reconciled_adopted"] == lost_answers
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 30


async def test_create_answer_held_past_the_timeout_is_reconciled_during_the_run(start_sim, tmp_path):
    """An answer held longer than the client waits times the create out: the item is reconciled during the same
    run and its task adopted; nothing is sent twice."""
    sim = await start_sim(**FAST, fault_rates={"hold_response": 0.3}, hold_s=60.0, seed=2)
    # 0.2 wall seconds are 20 service seconds at this speed: every held answer (60 s) outlasts it.
    engine = engine_for(sim, tmp_path / "run", request_timeout_s=0.2, reconcile=QUICK)
    report = await engine.run(manifest_of(tmp_path, 16, "held"))
    assert sim.faults_injected["hold_response"] > 0
    assert report["reconciled_adopted"] >= 1  # a held 429 may be proven taskless and sent again: allowed
    assert len(sim.tasks) == 16
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 16


async def test_crash_after_the_post_adopts_the_task_the_service_made(start_sim, sim_api_for, tmp_path):
    """Killed between the POST and the commit of its answer: the resumed run finds the task in the list and adopts
    it; the item is not sent again."""
    sim = await start_sim(**FAST)
    manifest = manifest_of(tmp_path, 3, "after")
    rows = crashed_mid_submit(tmp_path / "run", manifest, sim.clock)
    task_ids = {row.item_id: await post_as_the_engine_would(sim_api_for(sim), row) for row in rows}
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert report["reconciled_adopted"] == 3 and report["reconciled_resent"] == 0
    assert sim.requests["create"] == 3
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        assert {row.item_id: ledger.get(row.item_id).task_id for row in rows} == task_ids
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 3


async def test_crash_before_the_post_resends_only_once_the_list_proves_no_task(start_sim, tmp_path):
    """Killed after committing ``submitting`` but before the POST left: the item is sent again, but only after the
    list has been read and the window in which a task could have appeared has passed."""
    sim = await start_sim(**FAST)
    manifest = manifest_of(tmp_path, 2, "before")
    crashed_mid_submit(tmp_path / "run", manifest, sim.clock)
    engine = engine_for(sim, tmp_path / "run", reconcile=QUICK)
    report = await engine.run(manifest)
    assert report["reconciled_resent"] == 2 and report["reconciled_adopted"] == 0
    assert sim.requests["list"] >= 2 and sim.requests["create"] == 2
    grace_ms = (engine.config.reconcile.request_window_s + engine.config.reconcile.list_lag_s) * 1000
    # From the crashed attempt's commit to the decision that no task was made.
    waited = ledger_rows(
        tmp_path / "run",
        "SELECT max(at_ms) FILTER (WHERE from_state = 'unknown' AND to_state = 'planned')"
        " - min(at_ms) FILTER (WHERE to_state = 'submitting') FROM transitions GROUP BY item_id",
    )
    assert len(waited) == 2 and all(row[0] >= grace_ms for row in waited)
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 2


async def test_items_sharing_a_prompt_never_have_two_creates_in_doubt(start_sim, tmp_path):
    """The task list tells tasks apart by prompt only, so while one create with a prompt is unanswered no other
    item with that prompt is sent: under resets after creation, every item still gets its own task and seed,
    and no request is paid twice."""
    sim = await start_sim(**FAST, fault_rates={"reset_after": 0.4}, seed=9)
    path = tmp_path / "seeds.yaml"
    path.write_text(
        "name: seeds\n"
        "defaults: {model: wan2.2-t2i-flash, size: '512*512', n: 1, prompt_extend: false}\n"
        "prompts:\n"
        "  - {prompt: a lone pine on a ridge, seed: [11, 12, 13, 14, 15, 16]}\n"
    )
    manifest = Manifest.from_yaml(path)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(manifest)
    assert sim.faults_injected["reset_after"] > 0 and report["reconciled_adopted"] > 0
    result = audit(tmp_path / "run", sim.billing)
    assert result.duplicates == [], "the same request was paid twice"
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        for row in ledger.iter_items([ItemState.saved]):
            assert sim.tasks[row.task_id].seed == row.request["seed"]
    assert result.clean and result.billed == result.saved == 6


async def test_reconciliation_holds_when_our_clock_and_the_services_disagree(start_sim, sim_api_for, tmp_path):
    """With our clock ten minutes behind the service's (a machine clock off, or a separate simulator process at
    another start time), an unknown item still finds and adopts the task the service made."""
    sim = await start_sim(**FAST)
    skewed = ScaledClock(speed=sim.clock.speed, start_s=sim.clock.now() - 600.0)
    manifest = manifest_of(tmp_path, 2, "skew")
    rows = crashed_mid_submit(tmp_path / "run", manifest, skewed)
    for row in rows:
        await post_as_the_engine_would(sim_api_for(sim), row)
    report = await engine_for(sim, tmp_path / "run", clock=skewed, reconcile=QUICK).run(manifest)
    assert report["reconciled_adopted"] == 2 and report["reconciled_resent"] == 0
    result = audit(tmp_path / "run", sim.billing)
    assert result.duplicates == [], "the same request was paid twice"
    assert result.clean and result.billed == result.saved == 2


async def test_a_throttled_answer_with_a_broken_body_is_retried_not_rejected(start_sim, tmp_path):
    """A 429 whose JSON body arrives broken (the chaos profile does this) is still a throttle: the item is sent
    again later, never marked rejected for good."""
    # The service's quota is far below the model's documented rate, so most creates are answered 429.
    quotas = {"wan2.2-t2i-flash": {"submit_rps": 0.2}}
    sim = await start_sim(**FAST, quotas=quotas, fault_rates={"malformed_json": 0.6}, seed=6)
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(
        manifest_of(tmp_path, 10, "throttled", models=MODELS[:1])
    )
    assert sim.statuses[("create", 429)] > 0 and sim.faults_injected["malformed_json"] > 0
    assert report["items"]["rejected"] == 0, report["failures"]
    assert report["items"]["saved"] == 10
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 10


async def test_the_last_create_lost_before_the_service_saw_it_is_sent_again_in_the_same_run(start_sim, tmp_path):
    """The only create of a run is reset before the service handles it: once the list proves no task was made the
    item is sent again, in the same run, and saved; the run does not end leaving it planned."""
    sim = await start_sim(**FAST, fault_rates={"reset_before": 1.0})

    async def calm_after_the_first_reset() -> None:
        while not sim.statuses[("create", 0)]:
            await asyncio.sleep(0)
        sim.set_faults("none")

    calm = asyncio.create_task(calm_after_the_first_reset())
    report = await engine_for(sim, tmp_path / "run", reconcile=QUICK).run(
        manifest_of(tmp_path, 1, "last one", models=MODELS[:1])
    )
    await calm
    assert report["reconciled_resent"] == 1
    assert report["items"]["saved"] == 1, report["items"]
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 1
