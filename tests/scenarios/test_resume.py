"""Runs that meet trouble and resume: long stops, account failures, a second run on one folder, disk trouble.

Each test ends with the billing log as the judge: every image the service
billed is on disk or reported lost with its cost, and no request was paid
twice. Account and lock failures must leave everything unsent in the ledger,
ready for the run that follows the fix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import signal
from pathlib import Path

import pytest

from helpers.engine import engine_for, run_stopped_when
from helpers.ledger import count_items, ledger_rows
from helpers.manifest import load_manifest, numbered, write_file, write_manifest
from helpers.outputs import audit
from helpers.proc import start_run, start_sim, wait_until
from wanbatch import catalog
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.manifest import Manifest
from wanbatch.service.wire import build_body
from wanbatch.sim import AccountConfig
from wanbatch.stages.download import DownloadConfig

FLASH_PRICE = 0.14  #: CNY per image, Beijing (catalog)
TWO_MODELS = ("wan2.2-t2i-flash", "wanx2.1-t2i-turbo")
FAST = {"speed": 100.0, "durations": {"*": 3.0}}
DAY_S = 24 * 3600.0


def manifest_of(tmp_path: Path, count: int, tag: str, models: tuple[str, ...] = (), **options) -> Manifest:
    prompts = numbered(count, tag, models=models)
    return load_manifest(tmp_path, file_name=f"{tag}.yaml", name=tag, prompts=prompts, **options)


def billed_cost(billing: list[dict], task_ids: set[str], price: float = FLASH_PRICE) -> float:
    return sum(price for record in billing if record["task_id"] in task_ids)


# --- long stops -----------------------------------------------------------------------------------


async def test_long_stop_after_urls_died_reports_the_images_expired_with_count_and_cost(start_sim, tmp_path):
    """Images generated but not saved (every download broke until the user stopped the run) and resumed a day
    later, when their URLs are dead: each is reported expired, paid and lost, with its count and cost; nothing is
    sent again."""
    sim = await start_sim(**FAST, fault_rates={"truncated_download": 1.0})
    manifest = manifest_of(tmp_path, 4, "dead urls", n=2)
    first = await run_stopped_when(
        engine_for(sim, tmp_path / "run"), manifest, lambda: sim.faults_injected["truncated_download"] >= 8
    )
    assert first["items"]["generated"] == 4 and first["images"]["pending"] == 8
    assert len(first["images_not_saved_yet"]) == 8
    sim.set_faults("none")
    sim.advance(DAY_S + 3600)
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    assert report["items"]["expired"] == 4 and report["images"]["expired"] == 8
    assert len(report["images_expired"]) == 8
    assert report["cost_lost"] == {"CNY": pytest.approx(8 * FLASH_PRICE)}
    assert report["cost"] == {"CNY": pytest.approx(len(sim.billing) * FLASH_PRICE)}
    assert sim.requests["create"] == 4
    assert audit(tmp_path / "run", sim.billing).duplicates == []


async def made_long_ago(sim, api, run_dir: Path, manifest: Manifest, *, count: int, gap_s: float) -> list[str]:
    """Plan ``manifest`` and make the tasks of its first ``count`` items on the service, the last item's first,
    ``gap_s`` of service time apart, the ledger recording each as a run would (queued), with no run since.
    Returns the task ids, in manifest order."""
    with Ledger.open(run_dir, clock=sim.clock) as ledger:
        run = ledger.begin_run()
        ledger.add_items(manifest.items(), run=run, price_of=lambda item: FLASH_PRICE)
        rows = list(ledger.iter_items([ItemState.planned]))[:count]
        task_ids = {}
        for row in reversed(rows):
            ledger.transition(row.item_id, ItemState.submitting, expect=ItemState.planned)
            offer = catalog.offer(row.region, row.model)
            body = build_body(row.request, api_name=offer.api_name, protocol=offer.model.protocol)
            status, answer = await api.call(
                "POST", "/services/aigc/text2image/image-synthesis", json=body, headers={"X-DashScope-Async": "enable"}
            )
            assert status == 200, answer
            task_ids[row.item_id] = answer["output"]["task_id"]
            ledger.transition(row.item_id, ItemState.queued, task_id=task_ids[row.item_id])
            sim.advance(gap_s)
    return [task_ids[row.item_id] for row in rows]


async def test_long_stop_after_tasks_were_forgotten_reports_them_expired_and_paid(start_sim, sim_api_for, tmp_path):
    """Tasks made before a stop of two days, when the service no longer knows them: their items are reported
    expired with the images' count and cost (the service billed them); the items never sent are made."""
    sim = await start_sim(**FAST)
    manifest = manifest_of(tmp_path, 5, "forgotten")
    made = set(await made_long_ago(sim, sim_api_for(sim), tmp_path / "run", manifest, count=3, gap_s=60.0))
    sim.advance(2 * DAY_S)
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    billing = sim.billing
    assert {r["task_id"] for r in billing} >= made, "the tasks made before the stop were billed"
    assert report["items"]["expired"] == 3 and report["items"]["saved"] == 2
    assert report["failures"]["TaskExpired"]["count"] == 3
    assert report["cost_lost"] == {"CNY": pytest.approx(billed_cost(billing, made))}
    assert report["cost"] == {"CNY": pytest.approx(billed_cost(billing, {r["task_id"] for r in billing}))}
    result = audit(tmp_path / "run", billing)
    assert result.duplicates == [] and result.open_items == [] and result.unexplained == []


async def test_resume_after_a_long_stop_saves_the_nearest_deadlines_first(start_sim, sim_api_for, tmp_path):
    """Tasks that ended hours apart during a stop: the deadlines recorded for their images are never later than the
    URLs really die, and the images are saved soonest-to-die first, not in manifest order."""
    sim = await start_sim(**FAST, fault_rates={"truncated_download": 1.0})
    manifest = manifest_of(tmp_path, 4, "deadlines")
    # Made last item first, five hours apart: the last item's URL dies first, in about four hours.
    task_ids = await made_long_ago(sim, sim_api_for(sim), tmp_path / "run", manifest, count=4, gap_s=5 * 3600.0)
    # Every download breaks until the user stops the run: all stay pending.
    first = await run_stopped_when(
        engine_for(sim, tmp_path / "run"), manifest, lambda: sim.faults_injected["truncated_download"] >= 4
    )
    assert first["images"]["pending"] == 4
    dies_at_ms = {task_id: sim.tasks[task_id].url_expires_s * 1000 for task_id in task_ids}
    recorded = ledger_rows(
        tmp_path / "run", "SELECT i.task_id, m.deadline_ms FROM images m JOIN items i USING (item_id)"
    )
    late = {task_id: deadline - dies_at_ms[task_id] for task_id, deadline in recorded if deadline > dies_at_ms[task_id]}
    assert late == {}, f"deadlines recorded past the URL's death (ms late): {late}"
    sim.set_faults("none")
    await engine_for(sim, tmp_path / "run", download=DownloadConfig(workers=1)).run(manifest)
    saved_order = [
        row[0]
        for row in ledger_rows(
            tmp_path / "run",
            "SELECT i.task_id FROM transitions t JOIN items i USING (item_id) WHERE t.to_state = 'saved' ORDER BY t.id",
        )
    ]
    assert saved_order == sorted(task_ids, key=dies_at_ms.get) == list(reversed(task_ids))


# --- account failures -----------------------------------------------------------------------------


def broke_account(refusal: str) -> AccountConfig:
    return AccountConfig(name="broke", keys={"sk-broke": "beijing"}, refusal=refusal)


@pytest.mark.parametrize(
    ("refusal", "key", "advice"),
    [
        ("Arrearage", "sk-broke", "Top up the account"),
        ("InvalidApiKey", "sk-not-a-key", "Check the key for this region"),
        ("AccessDenied.Unpurchased", "sk-broke", "may use this model"),
    ],
)
async def test_account_failure_stops_submitting_and_says_what_to_do(start_sim, tmp_path, caplog, refusal, key, advice):
    """Arrears, a bad key or a 403 on the model: the lanes it affects stop at the first refusal, nothing is made,
    the items stay planned for the run after the fix, and the log says what to do."""
    accounts = () if refusal == "InvalidApiKey" else (broke_account(refusal),)
    sim = await start_sim(**FAST, accounts=accounts)
    manifest = manifest_of(tmp_path, 16, f"refused {refusal}", models=TWO_MODELS)
    with caplog.at_level(logging.INFO, logger="wanbatch"):
        report = await engine_for(sim, tmp_path / "run", key=key).run(manifest)
    assert sim.tasks == {} and sim.billing == []
    # A lane's first create goes alone until answered: one refused create per lane, however slow the answer.
    assert sim.requests["create"] <= len(TWO_MODELS), "it kept sending after the refusal"
    assert report["items"]["planned"] == 16
    assert set(report["blocked"]) == {f"beijing/{model}" for model in TWO_MODELS}
    assert all(reason.startswith(refusal) for reason in report["blocked"].values())
    assert advice in caplog.text
    fixed = await engine_for(sim, tmp_path / "run").run(manifest)
    assert fixed["items"]["saved"] == 16
    assert audit(tmp_path / "run", sim.billing).clean


def refuse_creates_from_now(sim, refusal: str) -> None:
    """The account falls into arrears mid-run. The simulator's refusals are set per account at start, so its keys
    are re-issued carrying one (test-side control of the fake service, not of the engine)."""
    accounts = sim.state.accounts
    accounts._keys = {key: dataclasses.replace(info, refusal=refusal) for key, info in accounts._keys.items()}


async def test_arrears_mid_run_stop_new_submissions_and_finish_what_is_in_flight(start_sim, tmp_path):
    """The account refuses creates from some moment on: nothing more is sent, every task already made is followed
    and its images saved, and the unsent items stay planned."""
    sim = await start_sim(speed=100.0, durations={"*": 10.0})
    manifest = manifest_of(tmp_path, 12, "arrears")

    async def arrears_after_three_tasks() -> None:
        while len(sim.tasks) < 3:
            await asyncio.sleep(0.002)
        refuse_creates_from_now(sim, "Arrearage")

    switch = asyncio.create_task(arrears_after_three_tasks())
    report = await engine_for(sim, tmp_path / "run").run(manifest)
    await switch
    made = len(sim.tasks)
    assert made >= 3 and report["items"]["saved"] == made and report["items"]["planned"] == 12 - made
    assert set(report["blocked"]) == {"beijing/wan2.2-t2i-flash"}
    result = audit(tmp_path / "run", sim.billing)
    assert result.duplicates == [] and result.lost == [] and result.billed == made


def test_cli_account_failure_exits_4_and_prints_what_to_do(tmp_path):
    """From the command line, arrears end the run with exit 4 (halted), the lanes stopped and the advice printed."""
    config = {"accounts": {"broke": {"keys": {"sk-broke": "beijing"}, "refusal": "Arrearage"}}}
    sim = start_sim(tmp_path / "sim", speed=50.0, config=config)
    manifest = write_manifest(tmp_path, prompts=numbered(4, "cli arrears"))
    try:
        run = start_run(manifest, tmp_path / "run", sim=sim, key="sk-broke")
        assert run.wait(60) == 4
    finally:
        sim.stop()
    assert "submitting stopped for beijing/wan2.2-t2i-flash: Arrearage" in run.stdout()
    assert "Top up the account" in run.stderr()
    assert "sk-broke" not in run.stdout() + run.stderr()
    assert count_items(tmp_path / "run", "state = 'planned'") == 4


# --- one run per folder ---------------------------------------------------------------------------

#: A task takes a wall second: long enough to meet a run at work, short enough to let it finish.
LOCK_SIM = {"durations": {"*": 40.0}}


def test_second_run_on_the_same_folder_refuses_and_sends_nothing(tmp_path):
    """While a run works in a folder, a second run there exits 2 at once, naming the first run's pid, having
    changed nothing; the first finishes undisturbed."""
    sim = start_sim(tmp_path / "sim", speed=40.0, config=LOCK_SIM)
    manifest = write_manifest(tmp_path, prompts=numbered(4, "locked"))
    out = tmp_path / "run"
    try:
        first = start_run(manifest, out, sim=sim, tag="first")
        wait_until(lambda: count_items(out, "state = 'queued'") >= 1, what="the first run at work")
        # The first run is paused mid-batch while the second tries, as a busy machine may pause it: it still
        # holds the folder however long the second takes to start, with no long tasks to wait out.
        first.signal(signal.SIGSTOP)
        try:
            second = start_run(manifest, out, sim=sim, tag="second")
            assert second.wait(30) == 2
        finally:
            first.signal(signal.SIGCONT)
        assert first.proc.poll() is None, "the first run should still be working"
        assert f"in use by another run (pid {first.pid})" in second.stderr()
        assert "→" not in second.stderr() and len(ledger_rows(out, "SELECT run FROM runs")) == 1
        assert first.wait(60) == 0, first.stderr()[-3000:]
        sim.settle(20.0)
    finally:
        sim.stop()
    result = audit(out, sim.billing())
    assert result.clean and result.billed == result.saved == 4


def test_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    """A run killed with SIGKILL leaves its lock file behind; the next run in that folder starts, resumes it and
    finishes with nothing paid twice."""
    sim = start_sim(tmp_path / "sim", speed=40.0, config=LOCK_SIM)
    manifest = write_manifest(tmp_path, prompts=numbered(4, "stale lock"))
    out = tmp_path / "run"
    try:
        killed = start_run(manifest, out, sim=sim, tag="killed")
        # Killed with every task made and none half-sent: this test is about the lock, not reconciliation.
        wait_until(lambda: count_items(out, "state = 'queued'") == 4, what="the first run's tasks made")
        killed.signal(signal.SIGKILL)
        killed.wait(30)
        assert (out / "run.lock").read_text().strip() == str(killed.pid)
        resumed = start_run(manifest, out, sim=sim, tag="resumed")
        assert resumed.wait(60) == 0, resumed.stderr()[-3000:]
        sim.settle(20.0)
    finally:
        sim.stop()
    result = audit(out, sim.billing())
    assert result.clean and result.billed == result.saved == 4


# --- disk trouble ---------------------------------------------------------------------------------


async def test_unwritable_image_folder_leaves_images_generated_and_a_resume_saves_them(start_sim, tmp_path):
    """The folder an image goes into cannot be made (a file stands in its way) until the user stops the run: the
    images stay generated, the report says why, and once the folder is fixed a resume saves them without sending
    anything again."""
    sim = await start_sim(**FAST)
    manifest = manifest_of(tmp_path, 3, "blocked", output="{model}/{item_id}-{index}.png")
    blocker = tmp_path / "run" / "images" / "wan2.2-t2i-flash"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    first = await run_stopped_when(engine_for(sim, tmp_path / "run"), manifest, lambda: sim.requests["image"] >= 3)
    assert first["items"]["generated"] == 3 and first["images"]["pending"] == 3
    assert all("File exists" in entry["error"] for entry in first["images_not_saved_yet"])
    blocker.unlink()
    second = await engine_for(sim, tmp_path / "run").run(manifest)
    assert second["items"]["saved"] == 3 and sim.requests["create"] == 3
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 3


class FullDisk:
    """``open`` for the downloader's partial files, with writes failing ENOSPC ``failures`` times (forever when
    None); the run's other files (its report) are written as usual."""

    def __init__(self, failures: int | None) -> None:
        self.left, self.refused = failures, 0

    def open(self, path, mode="r", **kwargs):
        if not str(path).endswith(".part"):
            return open(path, mode, **kwargs)
        return _FullDiskFile(self, open(path, mode, **kwargs))


class _FullDiskFile:
    def __init__(self, disk: FullDisk, file) -> None:
        self._disk, self._file = disk, file

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def write(self, data: bytes) -> int:
        disk = self._disk
        if disk.left is None or disk.left > 0:
            disk.refused += 1
            if disk.left is not None:
                disk.left -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)


async def test_disk_full_for_a_while_is_retried_and_the_images_saved(start_sim, tmp_path, monkeypatch):
    """A disk that is full for a few writes: each image is retried while its URL lives and saved in the same run,
    each request paid once."""
    disk = FullDisk(failures=4)
    monkeypatch.setattr("wanbatch.atomic.open", disk.open, raising=False)
    sim = await start_sim(**FAST)
    report = await engine_for(sim, tmp_path / "run").run(manifest_of(tmp_path, 3, "full for a while"))
    assert disk.refused == 4
    assert report["items"]["saved"] == 3 and sim.requests["create"] == 3
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 3


async def test_disk_full_through_the_run_is_reported_and_saved_on_resume(start_sim, tmp_path, monkeypatch):
    """A disk full until the user stops the run: the images stay generated, the report names the disk error, no
    partial file is left in images/, and a resume after space is freed saves them."""
    disk = FullDisk(failures=None)
    monkeypatch.setattr("wanbatch.atomic.open", disk.open, raising=False)
    sim = await start_sim(**FAST)
    manifest = manifest_of(tmp_path, 2, "full")
    first = await run_stopped_when(engine_for(sim, tmp_path / "run"), manifest, lambda: disk.refused >= 2)
    assert first["items"]["generated"] == 2
    assert all("No space left on device" in entry["error"] for entry in first["images_not_saved_yet"])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["images_not_saved_yet"]
    assert not list((tmp_path / "run" / "images").glob("*.png"))
    monkeypatch.undo()
    second = await engine_for(sim, tmp_path / "run").run(manifest)
    assert second["items"]["saved"] == 2 and sim.requests["create"] == 2
    result = audit(tmp_path / "run", sim.billing)
    assert result.clean and result.billed == result.saved == 2


# --- an unchanged manifest --------------------------------------------------------------------------


def prompts_job(tmp_path: Path, prompts: list[str]) -> Path:
    """A manifest reading its prompts from a .txt file, one image each."""
    write_file(tmp_path, "prompts.txt", "".join(f"{prompt}\n" for prompt in prompts))
    return write_manifest(tmp_path, name="resumed", prompts=[{"file": "prompts.txt"}])


async def half_done(start_sim, tmp_path: Path, prompts: list[str]):
    """A run stopped by its budget halfway: half the items saved, the rest planned."""
    sim = await start_sim(**FAST)
    job = prompts_job(tmp_path, prompts)
    first = await engine_for(sim, tmp_path / "run", budget=FLASH_PRICE * (len(prompts) // 2)).run(
        Manifest.from_yaml(job)
    )
    assert (
        first["items"]["saved"] == len(prompts) // 2 and first["items"]["planned"] == len(prompts) - len(prompts) // 2
    )
    return sim, job


async def test_resume_of_an_unchanged_manifest_takes_its_items_from_the_ledger(start_sim, tmp_path, caplog):
    """The same manifest and prompts file again: nothing is added or re-marked, the rest is sent, none twice."""
    prompts = ["pond", "hill", "road", "barn", "mill", "reed"]
    sim, job = await half_done(start_sim, tmp_path, prompts)
    with caplog.at_level(logging.INFO, logger="wanbatch"):
        report = await engine_for(sim, tmp_path / "run").run(Manifest.from_yaml(job))
    assert "manifest unchanged since run 1" in caplog.text
    assert (report["items_added"], report["items_existing"], report["items_no_longer_in_manifest"]) == (0, 6, 0)
    assert report["submitted"] == 3 and report["items"]["saved"] == 6
    assert report["items_in_manifest"]["saved"] == 6
    # The items keep the marks of the run that planned them: the second run did not write them again.
    assert {row[0] for row in ledger_rows(tmp_path / "run", "SELECT DISTINCT last_seen_run FROM items")} == {1}
    result = audit(tmp_path / "run", sim.billing)
    assert result.duplicates == [] and result.saved == 6 == len(sim.billing)


async def test_resume_after_a_prompts_file_changed_plans_again(start_sim, tmp_path):
    """One line of the prompts file edited: its new prompt is planned and sent, the old one is left, none twice."""
    prompts = ["pond", "hill", "road", "barn", "mill", "reed"]
    sim, job = await half_done(start_sim, tmp_path, prompts)
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in [*prompts[:5], "reeds at dusk"]))
    report = await engine_for(sim, tmp_path / "run").run(Manifest.from_yaml(job))
    assert (report["items_added"], report["items_existing"], report["items_no_longer_in_manifest"]) == (1, 5, 1)
    assert report["submitted"] == 3 and report["items_in_manifest"]["saved"] == 6
    sent = {json.loads(row[0])["prompt"] for row in ledger_rows(tmp_path / "run", "SELECT request FROM items")}
    assert "reeds at dusk" in sent
    (left,) = ledger_rows(tmp_path / "run", "SELECT request, state FROM items WHERE last_seen_run < 2")
    assert json.loads(left["request"])["prompt"] == "reed" and left["state"] == "planned"
    assert audit(tmp_path / "run", sim.billing).duplicates == []
    # Changed back: the ledger's record is of the edited file now, so this run plans again too.
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    again = await engine_for(sim, tmp_path / "run").run(Manifest.from_yaml(job))
    assert (again["items_added"], again["items_existing"], again["items_no_longer_in_manifest"]) == (0, 6, 1)
    assert again["submitted"] == 1 and again["items_in_manifest"]["saved"] == 6


async def test_a_plan_kept_in_the_ledger_still_holds_the_budget(tmp_path):
    """A resume of an unchanged manifest takes its plan from the ledger, and a budget below it still refuses."""
    import wanbatch
    from wanbatch.stages.intake import stored_plan

    job = prompts_job(tmp_path, ["pond", "hill"])
    await wanbatch.run(job, out=tmp_path / "run", simulate=True, speed=600, gallery=False)
    plan = stored_plan(tmp_path / "run", Manifest.from_yaml(job))
    assert plan is not None and plan["items"] == 2 and plan["cost"] == {"CNY": pytest.approx(2 * FLASH_PRICE)}
    with pytest.raises(wanbatch.BudgetExceeded, match=r"0\.28 CNY .* over the budget of 0\.10"):
        await wanbatch.run(job, out=tmp_path / "run", simulate=True, budget=0.1)
    (tmp_path / "prompts.txt").write_text("pond\nhill\nroad\n")
    assert stored_plan(tmp_path / "run", Manifest.from_yaml(job)) is None
