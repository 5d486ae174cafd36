"""The engine end to end against the simulator over loopback: manifest → submit → track → download → outputs."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from PIL import Image

from helpers.engine import engine_for
from helpers.ledger import reads_outside_writes
from helpers.manifest import load_manifest, numbered
from helpers.outputs import assert_billed_once_and_saved, metadata
from wanbatch.engine import Engine, EngineConfig
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.manifest import Manifest

FOXES = """\
name: foxes
defaults: {model: wan2.2-t2i-flash, size: "1024*1024", n: 1, prompt_extend: false}
prompts:
  - a red fox in fresh snow
  - a red fox at dawn, watercolor
"""

FAST = {"speed": 200.0, "durations": {"*": 4.0}}


async def test_minimal_manifest_saves_every_image(start_sim, tmp_path):
    """The issue's minimal manifest runs as written: two items, two verified 1024² PNGs, metadata and report."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, FOXES)
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    run_dir = tmp_path / "run"
    assert report["items"]["saved"] == 2 and report["images"]["saved"] == 2
    rows = metadata(run_dir)
    assert sorted(r["prompt"] for r in rows) == ["a red fox at dawn, watercolor", "a red fox in fresh snow"]
    for row in rows:
        with Image.open(run_dir / row["file_name"]) as img:
            assert (img.format, img.size) == ("PNG", (1024, 1024))
        assert row["file_name"].startswith("images/") and row["model"] == "wan2.2-t2i-flash"
    assert report["cost"] == {"CNY": pytest.approx(0.28)}
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["items"]["saved"] == 2
    assert_billed_once_and_saved(sim, run_dir)


async def test_matrix_over_models_and_sizes_gets_each_size(start_sim, tmp_path):
    """A matrix over models and sizes gives one item per cell, each image of the size its cell asked for."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(
        tmp_path,
        """\
        name: grid
        defaults: {n: 1, prompt_extend: false, seed: 7}
        prompts:
          - prompt: "a lighthouse, {style}"
            matrix:
              style: [ink, oil]
              model: [wan2.2-t2i-flash, wan2.6-t2i]
              size: ["1280*1280", "1440*1024"]
        """,
    )
    assert manifest.count() == 8
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 8
    sizes = Counter((r["model"], r["size"]) for r in metadata(tmp_path / "run"))
    assert sizes == {(m, s): 2 for m in ("wan2.2-t2i-flash", "wan2.6-t2i") for s in ("1280*1280", "1440*1024")}
    for row in metadata(tmp_path / "run"):
        with Image.open(tmp_path / "run" / row["file_name"]) as img:
            assert "*".join(map(str, img.size)) == row["size"]


async def test_rate_limits_respected_without_a_burst_at_start(start_sim, tmp_path):
    """No 429 at all, and in no simulated second do a model's creates exceed its submit quota."""
    # A modest speed: at 10x, 11 ms of scheduling delay on a busy machine already put three of flash's creates
    # (spaced 0.56 s) into one simulated second; at 4x it takes 28 ms.
    # The account may run every task at once (granted on both sides), so the submit rate alone spaces the creates:
    # every create follows the one before as soon as the rate allows, none waits for a task's end.
    unlimited = {"*": {"concurrency": 100}}
    sim = await start_sim(speed=4.0, durations={"*": 1.0}, quotas=unlimited)
    prompts = "\n".join(f"  - subject number {i}" for i in range(12))
    manifest = load_manifest(
        tmp_path,
        f"""\
name: steady
defaults: {{model: wan2.2-t2i-flash, size: "512*512", n: 1, prompt_extend: false}}
prompts:
{prompts}
  - prompt: "a tower, {{k}}"
    model: wan2.6-t2i
    size: "1024*1024"
    matrix: {{k: [a, b, c, d, e]}}
""",
    )
    # Stopped hard once every create is made: what follows (tracking, saving) is other tests' subject.
    running = asyncio.create_task(engine_for(sim, tmp_path / "run", quotas=unlimited).run(manifest))
    async with asyncio.timeout(60):
        while len(sim.tasks) < 17 and not running.done():
            await asyncio.sleep(0.02)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert len(sim.tasks) == 17
    assert not [key for key in sim.statuses if key[1] == 429], sim.statuses
    for model, rps in (("wan2.2-t2i-flash", 2), ("wan2.6-t2i", 1)):
        times = sorted(t.submit_s for t in sim.tasks.values() if t.model == model)
        for i, t in enumerate(times):
            in_window = sum(1 for u in times[i:] if u - t < 1.0)
            assert in_window <= rps, f"{model}: {in_window} creates within one second from {t}"


async def test_resume_after_stop_bills_nothing_twice(start_sim, tmp_path):
    """Stopped after a few submissions and resumed, the run ends with every item saved and nothing paid twice."""
    sim = await start_sim(speed=100.0, durations={"*": 3.0})
    manifest = load_manifest(tmp_path, prompts=numbered(12, "a paper boat"), n=2)
    run_dir = tmp_path / "run"
    engine = engine_for(sim, run_dir)

    async def stop_after_three() -> None:
        while sim.requests["create"] < 3:
            await asyncio.sleep(0.005)
        engine.interrupt()

    stopper = asyncio.create_task(stop_after_three())
    first = await engine.run(manifest)
    await stopper
    assert first["interrupted"] and 0 < first["items"]["saved"] < 12
    assert first["items"]["planned"] > 0
    second = await engine_for(sim, run_dir).run(Manifest.from_yaml(tmp_path / "job.yaml"))
    assert second["items"]["saved"] == 12 and second["items_existing"] == 12 and second["items_added"] == 0
    assert len(sim.billing) == 24
    assert_billed_once_and_saved(sim, run_dir)


async def test_resume_after_a_hard_cancel(start_sim, tmp_path):
    """A run torn down mid-flight (as by a crash) resumes from its ledger: all saved, nothing billed twice."""
    sim = await start_sim(speed=100.0, durations={"*": 3.0})
    manifest = load_manifest(tmp_path, prompts=numbered(10, "a glass marble"), model="wanx2.1-t2i-turbo")
    run_dir = tmp_path / "run"
    task = asyncio.create_task(engine_for(sim, run_dir).run(manifest))
    while sim.requests["create"] < 4:
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    report = await engine_for(sim, run_dir).run(Manifest.from_yaml(tmp_path / "job.yaml"))
    assert report["items"]["saved"] == 10, report
    assert_billed_once_and_saved(sim, run_dir)


async def test_partial_failures_keep_the_good_images(start_sim, tmp_path):
    """With images failing at random, every good image is saved and every failed one recorded, none billed."""
    sim = await start_sim(**FAST, image_failure_rate=0.4, seed=3)
    manifest = load_manifest(tmp_path, prompts=numbered(6, "a clay pot"), n=4)
    run_dir = tmp_path / "run"
    report = await engine_for(sim, run_dir).run(manifest)
    assert report["images"]["failed"] > 0 and report["images"]["saved"] > 0
    assert report["images"]["saved"] + report["images"]["failed"] == 24
    assert report["images"]["saved"] == len(sim.billing) == len(metadata(run_dir))
    with Ledger.open(run_dir, clock=sim.clock, create=False) as ledger:
        for row in ledger.iter_items(list(ItemState)):
            images = ledger.images_of(row.item_id)
            good = sum(i.state is ImageState.saved for i in images)
            assert row.state is (ItemState.saved if good else ItemState.failed)
            assert row.cost == pytest.approx(good * 0.14)
    assert_billed_once_and_saved(sim, run_dir)


async def test_moderation_rejection_is_final_and_reported(start_sim, tmp_path):
    """A prompt the service's moderation refuses makes its item rejected, with code and manifest line; others run."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(
        tmp_path,
        """\
        name: mixed
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1, prompt_extend: false}
        prompts:
          - a calm lake
          - something sim-inappropriate here
        """,
    )
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 1 and report["items"]["rejected"] == 1
    failure = report["failures"]["DataInspectionFailed"]
    assert failure["count"] == 1 and failure["sources"][0]["source"].endswith("job.yaml:5")
    assert "inappropriate" in failure["states"]["rejected"]["message"]
    assert len(sim.billing) == 1


async def test_expired_urls_are_reported_as_paid_and_lost(start_sim, tmp_path):
    """Images whose URLs die before they are fetched end expired, counted and costed in the report."""
    sim = await start_sim(**FAST, url_ttl_s=0.0)
    manifest = load_manifest(tmp_path, FOXES)
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["expired"] == 2 and report["images"]["expired"] == 2
    assert len(report["images_expired"]) == 2 and report["cost"] == {"CNY": pytest.approx(0.28)}
    assert not list((tmp_path / "run" / "images").glob("*.png"))


async def test_unknown_outcomes_are_reconciled_not_resent(start_sim, tmp_path):
    """Resets after the task was created leave items unknown; they are adopted from the list, never paid twice."""
    sim = await start_sim(**FAST, fault_rates={"reset_after": 0.4}, seed=5)
    manifest = load_manifest(tmp_path, prompts=numbered(10, "a kite"))
    from wanbatch.stages.reconcile import ReconcileConfig

    quick = ReconcileConfig(request_window_s=5.0, list_lag_s=0.0, retry_s=1.0)
    engine = engine_for(sim, tmp_path / "run", reconcile=quick)
    report = await engine.run(manifest)
    assert sim.faults_injected["reset_after"] > 0
    assert report["reconciled_adopted"] > 0  # the creates whose answers were lost made tasks: adopted
    # A reset can also hide a 429 (the fault strikes after handling, whatever the answer): then the list
    # proves no task was made and the item is sent again. Either way each request is paid once (below).
    assert report["reconciled_adopted"] + report["reconciled_resent"] >= 1
    assert report["items"]["saved"] == 10
    assert_billed_once_and_saved(sim, tmp_path / "run")


async def test_edited_manifest_adds_new_items_and_leaves_dropped_ones(start_sim, tmp_path):
    """An edited manifest runs only its new items; items it no longer has are counted and left untouched."""
    sim = await start_sim(**FAST)
    run_dir = tmp_path / "run"
    path = tmp_path / "job.yaml"
    path.write_text(FOXES + "  - a red fox asleep\n")
    await engine_for(sim, run_dir).run(Manifest.from_yaml(path))
    path.write_text(
        FOXES.replace("  - a red fox at dawn, watercolor\n", "") + "  - a red fox asleep\n  - a red fox jumping\n"
    )
    report = await engine_for(sim, run_dir).run(Manifest.from_yaml(path))
    assert (report["items_added"], report["items_existing"], report["items_no_longer_in_manifest"]) == (1, 2, 1)
    assert report["submitted"] == 1 and report["items"]["saved"] == 4
    assert report["items_in_manifest"]["saved"] == 3
    assert len(sim.billing) == 4


async def test_stale_planned_items_are_not_sent(start_sim, tmp_path):
    """An item planned by an earlier manifest and since removed from it is never submitted."""
    sim = await start_sim(**FAST)
    run_dir = tmp_path / "run"
    path = tmp_path / "job.yaml"
    path.write_text(FOXES)
    engine = engine_for(sim, run_dir)
    engine.interrupt()  # plan only: nothing is submitted
    first = await engine.run(Manifest.from_yaml(path))
    assert first["items"]["planned"] == 2 and sim.requests["create"] == 0
    path.write_text(FOXES.replace("  - a red fox at dawn, watercolor\n", ""))
    report = await engine_for(sim, run_dir).run(Manifest.from_yaml(path))
    assert report["items"]["saved"] == 1 and report["items"]["planned"] == 1
    assert report["items_in_manifest"]["planned"] == 0 and sim.requests["create"] == 1


async def test_wan26_sync_endpoint_saves_images(start_sim, tmp_path):
    """wan2.6 items marked `sync` go through the synchronous endpoint and are saved like any other."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(
        tmp_path,
        """\
        name: sync
        defaults: {model: wan2.6-t2i, size: "1280*1280", n: 2, prompt_extend: false, sync: true}
        prompts:
          - a snow globe on a desk
        """,
    )
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 1 and report["images"]["saved"] == 2
    assert sim.requests["sync"] == 1 and sim.requests["create"] == 0
    assert len(sim.billing) == 2 and len({r["fingerprint"] for r in sim.billing}) == 1
    assert [row["image_index"] for row in metadata(tmp_path / "run")] == [0, 1]


async def test_cancel_pending_cancels_only_what_waits_on_the_service(start_sim, tmp_path):
    """Interrupted with cancel_pending, tasks still PENDING are canceled (not billed); running ones are saved."""
    sim = await start_sim(speed=50.0, durations={"*": 30.0})
    manifest = load_manifest(tmp_path, prompts=numbered(8, "a tin robot"))
    engine = engine_for(sim, tmp_path / "run")

    async def stop_when_backlog_waits() -> None:
        while sim.requests["create"] < 4:  # concurrency 2 running + a backlog of 2 pending
            await asyncio.sleep(0.005)
        engine.interrupt(cancel_pending=True)

    stopper = asyncio.create_task(stop_when_backlog_waits())
    report = await engine.run(manifest)
    await stopper
    assert report["canceled_on_service"] == 2 and report["items"]["canceled"] == 2
    assert report["items"]["saved"] == 2 and report["items"]["planned"] == 4
    assert sorted(t.status for t in sim.tasks.values()) == ["CANCELED", "CANCELED", "SUCCEEDED", "SUCCEEDED"]
    assert len(sim.billing) == 2


async def test_an_unreachable_service_stops_the_lane_with_advice(tmp_path):
    """With nothing listening, the lane stops after a few refused connections instead of retrying every item."""
    import socket

    with socket.socket() as probe:  # a loopback port with nothing behind it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = load_manifest(tmp_path, prompts=numbered(40, "a stone bridge"))
    from wanbatch.clock import ScaledClock
    from wanbatch.stages.submit import SubmitConfig

    engine = Engine(
        run_dir=tmp_path / "run",
        keys={"beijing": "sk-x"},
        clock=ScaledClock(speed=1000.0),
        config=EngineConfig(
            base_url=f"http://127.0.0.1:{port}/api/v1", speed=1000.0, submit=SubmitConfig(unreachable_after=4)
        ),
    )
    report = await engine.run(manifest)
    assert report["items"]["planned"] == 40 and report["submitted"] == 0
    assert "Unreachable" in report["blocked"]["beijing/wan2.2-t2i-flash"]


async def test_a_finished_task_reads_back_nothing_it_wrote(start_sim, tmp_path, monkeypatch):
    """From submit to saved, the stages read no item or image row outside a write of their own: each write
    returns what it wrote, and a row read as planned while no submit of it was under way is sent as read."""
    sim = await start_sim(**FAST)
    manifest = load_manifest(tmp_path, prompts=numbered(12, "a lantern"), n=2)
    reads = reads_outside_writes(monkeypatch)
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["saved"] == 12 and report["images_saved_this_run"] == 24
    assert [read for read in reads if "WHERE item_id = " in read] == []
