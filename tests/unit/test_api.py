"""The Python API beside the CLI: wanbatch.run, budgets, retries, and the exported names."""

from __future__ import annotations

import pytest

import wanbatch
from helpers.engine import engine_for
from helpers.manifest import load_manifest
from wanbatch.errors import ConfigError
from wanbatch.ledger import Ledger

FAST = {"speed": 200.0, "durations": {"*": 4.0}}


def test_exported_members():
    """The public API is exactly what __all__ lists, and each name exists."""
    assert sorted(wanbatch.__all__) == [
        "BudgetExceeded",
        "Engine",
        "EngineConfig",
        "Manifest",
        "ManifestError",
        "WanbatchError",
        "__version__",
        "make_plan",
        "run",
    ]
    for name in wanbatch.__all__:
        assert hasattr(wanbatch, name), name


async def test_run_returns_the_report(tmp_path):
    """`await wanbatch.run(path, out=..., simulate=True)` runs the manifest and returns its report."""
    report = await wanbatch.run("jobs/foxes.yaml", out=tmp_path / "run", simulate=True, speed=600)
    assert report["items"]["saved"] == 2 and report["images"]["saved"] == 2
    assert (tmp_path / "run" / "report.json").exists()


async def test_a_plan_over_budget_is_refused_before_anything_is_sent(tmp_path):
    """A manifest whose plan costs more than its budget raises BudgetExceeded and leaves no run folder."""
    job = load_manifest(
        tmp_path,
        """\
        name: dear
        budget: 0.5
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 4}
        prompts: [a, b]
        """,
    )
    with pytest.raises(wanbatch.BudgetExceeded, match=r"1\.12 CNY .* over the budget of 0\.50"):
        await wanbatch.run(job, out=tmp_path / "run", simulate=True)
    assert not (tmp_path / "run").exists()


async def test_spending_stops_before_the_budget_would_pass(start_sim, tmp_path):
    """With a budget below the plan, submitting stops before spent plus in-flight cost would pass it."""
    sim = await start_sim(**FAST)
    job = load_manifest(
        tmp_path,
        """\
        name: capped
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 2}
        prompts: [one, two, three, four, five, six]
        """,
    )
    report = await engine_for(sim, tmp_path / "run", budget=1.0).run(job)  # 0.28 CNY an item: 3 fit
    assert report["items"]["saved"] == 3 and report["items"]["planned"] == 3
    assert report["budget"]["reached"] and report["cost"]["CNY"] == pytest.approx(0.84)
    assert sum(r["image_index"] >= 0 for r in sim.billing) == 6


async def test_retry_failed_resends_failed_but_not_moderated_items(start_sim, tmp_path):
    """retry_failed sends failed tasks again except moderation refusals, which go again only with retry_moderated."""
    failing = await start_sim(**FAST, image_failure_rate=1.0, seed=1)
    job = load_manifest(
        tmp_path,
        """\
        name: retry
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts: [pond, hill, road, barn, mill, reed, a sim-inappropriate sign]
        """,
    )
    first = await engine_for(failing, tmp_path / "run").run(job)
    assert first["items"]["failed"] == 6 and first["items"]["rejected"] == 1
    moderated = first["failures"].get("DataInspectionFailed", {}).get("count", 0)  # the rejected one, and outputs
    healthy = await start_sim(**FAST)  # the service recovered
    again = await engine_for(healthy, tmp_path / "run").run(job)
    assert again["submitted"] == 0  # nothing is sent again unless asked
    retried = await engine_for(healthy, tmp_path / "run", retry_failed=True).run(job)
    assert retried["submitted"] == 7 - moderated and retried["items"]["saved"] == 7 - moderated
    refused_before = healthy.statuses[("create", 400)]
    last = await engine_for(healthy, tmp_path / "run", retry_moderated=True).run(job)
    assert last["submitted"] == moderated - 1 and last["items"]["saved"] == 6 and last["items"]["rejected"] == 1
    assert healthy.statuses[("create", 400)] == refused_before + 1  # the refused prompt was sent once more


async def test_cancel_queued_cancels_what_waits_and_keeps_what_runs(start_sim, tmp_path):
    """After a hard stop, cancel_queued cancels PENDING tasks; running ones stay queued for the next run."""
    import asyncio

    from wanbatch.stages.cancel import cancel_queued

    sim = await start_sim(speed=50.0, durations={"*": 600.0})  # long tasks: the stop finds them queued
    job = load_manifest(
        tmp_path,
        """\
        name: stopped
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts: [one, two, three, four, five, six]
        """,
    )
    engine = engine_for(sim, tmp_path / "run")
    run = asyncio.create_task(engine.run(job))
    while ((await engine.snapshot() or {}).get("counts") or {}).get("queued", 0) < 4:  # 2 running, a backlog of 2
        await asyncio.sleep(0.005)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    counts = await cancel_queued(tmp_path / "run", keys={"beijing": "sk-sim-beijing"}, base_url=sim.base_url)
    assert counts == {"canceled": 2, "running": 2, "failed": 0}
    assert sorted(t.status for t in sim.tasks.values()) == ["CANCELED", "CANCELED", "RUNNING", "RUNNING"]
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        counts = ledger.counts()
    assert (counts["canceled"], counts["queued"], counts["planned"]) == (2, 2, 2)


async def test_a_folder_resumes_only_against_the_service_it_was_made_against(start_sim, tmp_path):
    """A folder made with simulate=True is refused (ConfigError, nothing sent) when resumed through base_url or
    against the service's own hosts; force_backend goes on against the new one, which the folder then records."""
    job = tmp_path / "job.yaml"
    job.write_text("name: two\ndefaults: {model: wan2.2-t2i-flash, size: '512*512', n: 1}\nprompts: [one, two]\n")
    out = tmp_path / "run"
    await wanbatch.run(job, out=out, simulate=True, speed=600)
    job.write_text(job.read_text().replace("[one, two]", "[one, two, three]"))
    sim = await start_sim(**FAST)
    elsewhere = {"base_url": sim.base_url, "speed": FAST["speed"], "keys": {"beijing": "sk-sim-beijing"}}
    with pytest.raises(ConfigError, match=r"made against the embedded simulator \(--simulate\); this run would use "):
        await wanbatch.run(job, out=out, **elsewhere)
    with pytest.raises(ConfigError, match="would use the service's own hosts"):
        await wanbatch.run(job, out=out, keys={"beijing": "sk-not-a-real-key"})
    assert sum(sim.requests.values()) == 0
    report = await wanbatch.run(job, out=out, **elsewhere, force_backend=True)
    assert report["submitted"] == 1 and report["items"]["saved"] == 3
    again = await wanbatch.run(job, out=out, **elsewhere)  # the folder now records the new endpoint
    assert again["submitted"] == 0
    with pytest.raises(ConfigError, match=f"made against the endpoint {sim.base_url}"):
        await wanbatch.run(job, out=out, simulate=True, speed=600)
