"""Saving paid images through unkind object storage, and keeping them saved.

A URL that works may answer its first GETs with 403, 404, 410, 429 or 503
(tests/helpers/unkind.py puts that in front of the simulator's images): the
downloader tries again while the URL lives and gives up only at its deadline.
A saved image is fsynced with its folder before the ledger says so, and one
whose file is lost is fetched again on resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sqlite3
from pathlib import Path

from helpers.engine import engine_for
from helpers.manifest import load_manifest
from helpers.unkind import StorageRefusals, sim_with
from wanbatch.ledger import LEDGER_FILE, Ledger, SqliteLedger
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.manifest import Manifest
from wanbatch.stages.download import DownloadConfig

SPEED = 200.0
#: Short waits between tries, so that many tries fit in a test.
QUICK_RETRIES = DownloadConfig(retry_base_s=1.0, retry_max_s=20.0)


def manifest_of(directory: Path, prompts: list[str]) -> Manifest:
    return load_manifest(directory, prompts=prompts, name="storage", seed=3)


def images_by_prompt(run_dir: Path, clock) -> dict[str, tuple]:
    with Ledger.open(run_dir, clock=clock, create=False) as ledger:
        return {row.request["prompt"]: (row, ledger.images_of(row.item_id)) for row in ledger.iter_items(ItemState)}


def billed_once(sim) -> bool:
    fingerprints = [record["fingerprint"] for record in sim.billing]
    return len(fingerprints) == len(set(fingerprints))


async def test_a_working_url_refused_at_first_is_tried_again_until_saved(tmp_path):
    """403, 404, 410, 429 and 503 on the first eight GETs of a URL that works: each image is tried again with a
    backoff (past the six tries there used to be) and saved; none is written off before its deadline."""
    refusals = {"refused-403": 403, "refused-404": 404, "refused-410": 410, "refused-429": 429, "refused-503": 503}
    storage = StorageRefusals(refusals, times=8)
    prompts = [f"a fox {word}" for word in refusals]
    async with sim_with([storage.middleware], speed=SPEED, durations=2.0) as sim:
        report = await engine_for(sim, tmp_path / "run", download=QUICK_RETRIES).run(manifest_of(tmp_path, prompts))
    assert report["items"]["saved"] == len(prompts), report["items"]
    assert all(storage.refused[prompt] == 8 for prompt in prompts), storage.refused
    for prompt in prompts:
        times = [at for at, _ in storage.gets[prompt]]
        waits = [later - earlier for earlier, later in itertools.pairwise(times)]
        # Doubling from 1 s and capped at 20 s (the last would be 128 s uncapped); never early, late under load.
        assert all(wait >= min(2**i, 20.0) - 0.01 for i, wait in enumerate(waits)) and waits[-1] < 60, waits
    assert billed_once(sim)


async def test_a_url_refused_to_the_end_is_written_off_only_at_its_deadline(tmp_path):
    """A URL that answers 404 every time is tried until its deadline (from its Expires) and only then written off
    as expired, paid and lost; the image beside it is saved."""
    storage = StorageRefusals({"refused": 404}, times=None)
    prompts = ["a heron refused", "a heron untouched"]
    config = DownloadConfig(retry_base_s=1.0, retry_max_s=60.0)
    async with sim_with([storage.middleware], speed=SPEED, durations=2.0, url_ttl_s=900.0) as sim:
        report = await engine_for(sim, tmp_path / "run", download=config).run(manifest_of(tmp_path, prompts))
        items = images_by_prompt(tmp_path / "run", sim.clock)
    row, (image,) = items["a heron refused"]
    assert (row.state, image.state, image.error_code) == (ItemState.expired, ImageState.expired, "UrlExpired")
    tries = storage.gets["a heron refused"]
    assert len(tries) >= 10 and tries[-1][0] >= image.deadline_ms / 1000 > tries[-2][0], tries[-3:]
    assert items["a heron untouched"][0].state is ItemState.saved
    assert report["images"] == {"pending": 0, "saved": 1, "failed": 0, "expired": 1}


async def test_a_stopped_run_leaves_a_refused_image_pending_and_the_next_run_saves_it(tmp_path):
    """Stopped by the user while an image's URL keeps answering 503: the run ends without waiting for its next
    try, the image stays pending with the reason, and the next run saves it without paying again."""
    storage = StorageRefusals({"refused": 503}, times=None)
    manifest = manifest_of(tmp_path, ["an otter refused", "an otter untouched"])
    async with sim_with([storage.middleware], speed=SPEED, durations=2.0) as sim:
        engine = engine_for(sim, tmp_path / "run", download=DownloadConfig(retry_base_s=600.0))
        running = asyncio.create_task(engine.run(manifest))
        while not storage.refused["an otter refused"]:
            await asyncio.sleep(0.02)
        engine.interrupt()
        first = await asyncio.wait_for(running, 10)
        row, (image,) = images_by_prompt(tmp_path / "run", sim.clock)["an otter refused"]
        assert first["interrupted"] and row.state is ItemState.generated
        assert (image.state, image.error_code) == (ImageState.pending, "DownloadFailed")
        assert "503" in image.error_message
        storage.refusals.clear()
        second = await engine_for(sim, tmp_path / "run").run(manifest)
    assert second["items"]["saved"] == 2 and len(sim.billing) == 2 and billed_once(sim)


async def test_an_image_is_fsynced_with_its_folder_before_the_ledger_says_saved(tmp_path, monkeypatch):
    """Each image's file and then its folder are fsynced while the ledger still has it pending: a power loss
    cannot leave the ledger saying saved over a file that never reached the disk."""
    run_dir = tmp_path / "run"
    synced: list[tuple[str, set[str]]] = []  # (path fsynced, images the ledger had saved at that moment)
    real_fsync = os.fsync

    def saved_in_ledger() -> set[str]:
        with sqlite3.connect(f"{(run_dir / LEDGER_FILE).as_uri()}?mode=ro", uri=True) as conn:
            return {f"{i}-{n}" for i, n in conn.execute("SELECT item_id, image_index FROM images WHERE state='saved'")}

    def fsync(fd: int) -> None:  # the OS's call, watched: which file, and what the ledger said then
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), saved_in_ledger()))

    monkeypatch.setattr(os, "fsync", fsync)
    async with sim_with(speed=SPEED, durations=2.0) as sim:
        report = await engine_for(sim, run_dir).run(manifest_of(tmp_path, ["a wren", "a finch"]))
        items = images_by_prompt(run_dir, sim.clock)
    assert report["items"]["saved"] == 2
    for row, (image,) in items.values():
        key = f"{row.item_id}-{image.image_index}"
        file_synced = [i for i, (path, saved) in enumerate(synced) if path.endswith(f"{key}.part") and key not in saved]
        folder = str((run_dir / image.file_name).parent)
        folder_synced = [i for i, (path, saved) in enumerate(synced) if path == folder and key not in saved]
        assert file_synced and folder_synced and file_synced[0] < max(folder_synced), (key, synced)


async def test_saved_files_lost_before_a_resume_are_fetched_again_while_their_urls_live(tmp_path):
    """After a run, one image file is deleted and one cut short: the resume finds both, fetches them again and
    saves them whole, paying nothing again; once the URLs are dead, nothing can be fetched, and a missing file may
    only be a folder moved or unmounted: the record stays saved, and the run says what it could not find."""
    run_dir = tmp_path / "run"
    manifest = manifest_of(tmp_path, ["a vole", "a shrew", "a mole"])
    async with sim_with(speed=SPEED, durations=2.0) as sim:
        await engine_for(sim, run_dir).run(manifest)
        items = images_by_prompt(run_dir, sim.clock)
        (run_dir / items["a vole"][1][0].file_name).unlink()
        cut = run_dir / items["a shrew"][1][0].file_name
        cut.write_bytes(cut.read_bytes()[:100])
        fetched = sim.requests["image"]
        again = await engine_for(sim, run_dir).run(manifest)
        assert sim.requests["image"] == fetched + 2
        assert again["items"]["saved"] == 3 and again["images"]["saved"] == 3
        for _, (image,) in images_by_prompt(run_dir, sim.clock).values():
            assert (run_dir / image.file_name).stat().st_size == image.size_bytes
        (run_dir / items["a mole"][1][0].file_name).unlink()
        sim.advance(2 * 24 * 3600.0)
        late = await engine_for(sim, run_dir).run(manifest)
    assert late["items"]["saved"] == 3 and not late["images"]["expired"] and sim.requests["image"] == fetched + 2
    assert len(sim.billing) == 3 and billed_once(sim)


async def test_a_resume_that_cannot_look_at_the_saved_files_goes_on(tmp_path):
    """images/ turned into a file between runs: looking at the saved images fails with an error that is not
    'missing' (not a directory); the resume says so and finishes, leaving them recorded as saved."""
    run_dir = tmp_path / "run"
    manifest = manifest_of(tmp_path, ["a kiwi", "a kea"])
    async with sim_with(speed=SPEED, durations=2.0) as sim:
        await engine_for(sim, run_dir).run(manifest)
        for path in sorted((run_dir / "images").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (run_dir / "images").rmdir()
        (run_dir / "images").write_text("not a folder")
        again = await engine_for(sim, run_dir, gallery=False).run(manifest)
    assert again["items"]["saved"] == 2 and sim.requests["create"] == 2


async def test_a_deadline_is_never_later_than_a_day_after_the_task_ended(tmp_path):
    """A signed URL may say it lives a week (the service purges results after a day): the image's deadline is
    the task's end plus a day, not the URL's Expires."""
    from datetime import datetime

    from wanbatch.clock import ScaledClock
    from wanbatch.service.wire import SERVICE_TZ, task_view
    from wanbatch.stages.results import record_results
    from wanbatch.stages.track import TrackerConfig

    clock = ScaledClock()
    manifest = manifest_of(tmp_path, ["a tui"])
    with Ledger.open(tmp_path / "run", clock=clock) as ledger:
        ledger.add_items(manifest.items(), run=ledger.begin_run(), price_of=lambda i: 0.14)
        (row,) = ledger.iter_items([ItemState.planned])
        ledger.transition(row.item_id, ItemState.submitting, expect=ItemState.planned)
        queued = ledger.transition(row.item_id, ItemState.queued, task_id="t-1")
        now = clock.now()
        stamp = datetime.fromtimestamp(now, SERVICE_TZ).strftime("%Y-%m-%d %H:%M:%S.000")
        week = int(now + 7 * 86400)
        output = {
            "task_status": "SUCCEEDED",
            "submit_time": stamp,
            "end_time": stamp,
            "results": [{"orig_prompt": "a tui", "url": f"https://example.invalid/a.png?Expires={week}"}],
        }
        view = task_view({"output": output}, sent_s=now, now_s=now)
        recorded = await record_results(
            SqliteLedger(ledger), queued, view, now_s=now, config=TrackerConfig(), common={}
        )
        assert recorded.images == tuple(ledger.images_of(row.item_id))
    (image,) = recorded.images
    assert image.deadline_ms <= (now + 86400) * 1000


async def test_images_whose_names_meet_each_keep_a_file_of_their_own(tmp_path):
    """Six items whose pattern gives every image the same file name, saved by eight workers at once: one image
    takes the name, each other its other name; six files on disk, each the image the ledger records there."""
    manifest = load_manifest(tmp_path, prompts=[f"a cup number {i}" for i in range(6)], output="{model}.png")
    async with sim_with([], speed=SPEED, durations=2.0) as sim:
        report = await engine_for(sim, tmp_path / "run", gallery=False).run(manifest)
        with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
            saved = list(ledger.iter_images([ImageState.saved]))
    assert report["images"]["saved"] == 6 == len(saved)
    assert len({image.file_name for image in saved}) == 6, sorted(image.file_name for image in saved)
    for image in saved:
        assert hashlib.sha256((tmp_path / "run" / image.file_name).read_bytes()).hexdigest() == image.sha256
