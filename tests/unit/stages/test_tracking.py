"""How the tracker follows tasks: when it looks, with which requests, and what it does when its guesses
about the service are wrong. Against the simulator over loopback, with fixed running times where a count
of requests is asserted (the counts then do not depend on the machine's speed)."""

from __future__ import annotations

import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.outputs import assert_billed_once_and_saved
from helpers.unkind import UnknownAnswers, sim_with
from wanbatch.ledger import Ledger
from wanbatch.stages.track import Durations, TrackerConfig


def test_durations_start_from_the_catalog_and_follow_recent_tasks():
    durations = Durations(40.0)
    assert (durations.earliest_s, durations.latest_s) == (28.0, 52.0)
    assert durations.share_ended(28.0) == 0.0 and durations.share_ended(40.0) == 0.5
    for seconds in (10.0, 12.0, 11.0, 13.0, 9.0):
        durations.add(seconds)
    assert durations.earliest_s == 9.0 * 0.98 and durations.latest_s == 13.0
    assert durations.share_ended(11.0) == 0.6


def test_an_unknown_tracking_policy_is_refused():
    try:
        TrackerConfig(policy="eager")
    except ValueError as exc:
        assert "allowed prompt, frugal" in str(exc)
    else:
        raise AssertionError("an unknown policy was accepted")


async def _tracking_requests(start_sim, tmp_path, policy: str, count: int, **sim_config) -> int:
    """Queries plus lists the tracker of ``policy`` made for ``count`` flash tasks."""
    sim = await start_sim(speed=100.0, **sim_config)
    manifest = load_manifest(tmp_path, prompts=numbered(count, "a paper lantern"), size="1024*1024")
    run_dir = tmp_path / policy
    report = await engine_for(sim, run_dir, track=TrackerConfig(policy=policy)).run(manifest)
    assert report["items"]["saved"] == count
    assert_billed_once_and_saved(sim, run_dir)
    return sim.requests["query"] + sim.requests["list"]


async def test_frugal_tracking_asks_once_per_task_when_running_times_do_not_vary(start_sim, tmp_path):
    """The frugal tracker looks when the longest recent task would have ended: with fixed running times,
    once per task (a look can only come late, never early, so this holds on a slow machine too)."""
    requests = await _tracking_requests(
        start_sim, tmp_path, "frugal", 16, durations={"*": 6.0}, duration_distribution="fixed"
    )
    assert requests <= 1.25 * 16, requests


async def test_prompt_tracking_looks_from_the_earliest_likely_end(start_sim, tmp_path):
    """Running times spread ±30 %: the prompt tracker looks from the earliest likely end every 1.6 s, the
    frugal one at the latest; prompt asks several times as often."""
    spread = {"durations": {"*": 30.0}, "duration_spread": 0.3}
    frugal = await _tracking_requests(start_sim, tmp_path, "frugal", 10, **spread)
    prompt = await _tracking_requests(start_sim, tmp_path, "prompt", 10, **spread)
    assert frugal <= 1.3 * 10 and prompt >= 2 * frugal, (frugal, prompt)


async def test_several_due_tasks_are_seen_through_one_list(start_sim, tmp_path):
    """wan2.6 runs five tasks at once: while several may still run, one page of the task list looks at them
    all, and only the tasks it shows ended are queried (once each, for their images)."""
    sim = await start_sim(speed=100.0, durations={"*": 30.0}, duration_spread=0.3)
    manifest = load_manifest(tmp_path, prompts=numbered(15, "a paper lantern"), model="wan2.6-t2i", size="1280*1280")
    engine = engine_for(sim, tmp_path / "run")
    report = await engine.run(manifest)
    assert report["items"]["saved"] == 15
    assert sim.requests["list"] >= 5 and report["lists"] == sim.requests["list"]
    assert_settled(engine)
    assert_billed_once_and_saved(sim, tmp_path / "run")


def assert_settled(engine) -> None:
    """At the end the tracker believes nothing runs or waits on the service."""
    tracker = engine._tracker
    assert tracker.running == 0 and tracker.queued == 0 and len(tracker) == 0


@pytest.mark.parametrize(
    ("concurrency", "count"),
    [
        # One at a time, not two: tasks thought running are found still queued, and looked at again once
        # another ends.
        pytest.param(1, 8, id="fewer"),
        # Six at once: tasks thought queued behind two have ended already, and are found by their own look
        # (or a page of the task list) all the same.
        pytest.param(6, 12, id="more"),
    ],
)
async def test_the_service_running_another_number_of_tasks_than_the_catalog_says(
    start_sim, tmp_path, concurrency, count
):
    """The account's flash concurrency is not the catalog's two: everything is saved, nothing paid twice, and
    at the end the tracker's belief of what runs where is empty."""
    sim = await start_sim(speed=200.0, durations={"*": 5.0}, quotas={"wan2.2-t2i-flash": {"concurrency": concurrency}})
    manifest = load_manifest(tmp_path, prompts=numbered(count, "a paper lantern"), size="1024*1024")
    engine = engine_for(sim, tmp_path / "run")
    report = await engine.run(manifest)
    assert report["items"]["saved"] == count
    assert_settled(engine)
    assert_billed_once_and_saved(sim, tmp_path / "run")


async def test_a_failing_task_list_falls_back_to_queries(start_sim, tmp_path):
    """Every list answered 500: the due tasks are asked about one by one instead, and all is saved."""
    sim = await start_sim(
        speed=100.0,
        durations={"*": 30.0},
        fault_rates={"internal_error": 1.0},
        fault_endpoints=("list",),
    )
    manifest = load_manifest(tmp_path, prompts=numbered(10, "a paper lantern"), model="wan2.6-t2i", size="1280*1280")
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 10
    assert sim.requests["list"] >= 1 and sim.statuses[("list", 500)] == sim.requests["list"]
    assert sim.requests["query"] >= 10
    assert_billed_once_and_saved(sim, tmp_path / "run")


# --- a query that answers UNKNOWN -------------------------------------------------------------------


async def test_a_young_task_answered_unknown_is_asked_again_and_its_images_saved(tmp_path):
    """A task the service answers UNKNOWN for, an hour old at most, is not written off: it is looked at again,
    found SUCCEEDED, and its images saved; each request paid once."""
    unknown = UnknownAnswers("flicker", times=3)
    manifest = load_manifest(tmp_path, prompts=["a moth flicker", "a moth steady"], n=2)
    async with sim_with([unknown.middleware], speed=100.0, durations=3.0) as sim:
        report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert sum(unknown.answered.values()) == 3
    assert report["items"]["saved"] == 2 and report["images"]["saved"] == 4
    assert_billed_once_and_saved(sim, tmp_path / "run")


async def test_a_task_unknown_past_its_lifetime_is_written_off_at_its_planned_price(tmp_path):
    """A task answered UNKNOWN for good is asked again until its lifetime has passed since it was made, then
    written off as paid and lost at the price stored when it was planned (not the catalog's of today)."""
    unknown = UnknownAnswers("forgotten", times=None)
    manifest = load_manifest(tmp_path, prompts=["a gnat forgotten", "a gnat kept"], n=2)
    track = TrackerConfig(task_lifetime_s=120.0)
    async with sim_with([unknown.middleware], speed=100.0, durations=3.0) as sim:
        with Ledger.open(tmp_path / "run", clock=sim.clock) as ledger:  # planned when an image cost 1.0
            ledger.add_items(manifest.items(), run=ledger.begin_run(), price_of=lambda item: 1.0)
        started_s = sim.clock.now()
        report = await engine_for(sim, tmp_path / "run", track=track).run(manifest)
        ended_s = sim.clock.now()
    (forgotten,) = unknown.answered.values()
    assert forgotten >= 3 and ended_s - started_s >= 120.0
    assert report["items"]["saved"] == 1 and report["items"]["expired"] == 1
    assert report["failures"]["TaskExpired"]["count"] == 1
    assert report["cost_lost"] == {"CNY": pytest.approx(2 * 1.0)}
