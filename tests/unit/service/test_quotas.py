"""Raised quotas: the account's quota file paces the lanes, and --simulate takes a simulator config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

import wanbatch
from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.proc import wanbatch_cli
from wanbatch import catalog
from wanbatch.errors import ManifestInvalid
from wanbatch.service.quotas import apply_quotas, check_quotas, load_quotas

FLASH = catalog.offer("beijing", "wan2.2-t2i-flash")
RAISED = {"wan2.2-t2i-flash": {"submit_rps": 20, "concurrency": 8}}


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _peak_running(tasks) -> int:
    """The most tasks the service ran at one instant, from each task's planned start and end."""
    edges = sorted([(t.start_s, 1) for t in tasks] + [(t.end_s, -1) for t in tasks], key=lambda e: (e[0], e[1]))
    peak = running = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def test_raised_quotas_run_more_tasks_at_once(start_sim, tmp_path):
    """With the account's raised quotas given to the engine, the service runs more tasks at once than the
    catalog's concurrency allows, and nothing is throttled."""
    sim = await start_sim(speed=100.0, durations={"*": 30.0}, quotas=RAISED)
    job = load_manifest(tmp_path, prompts=numbered(16, "a raised quota"))
    engine = engine_for(sim, tmp_path / "run", quotas=check_quotas(RAISED))
    report = await engine.run(job)
    assert report["items"]["saved"] == 16
    assert _peak_running(sim.tasks.values()) >= 6 > FLASH.concurrency
    assert not any(status == 429 for (_, status) in sim.statuses)


async def test_simulate_takes_a_simulator_config_and_a_quota_file(tmp_path):
    """`run(simulate=True, sim_config=..., quotas=...)`: the embedded simulator has the raised quotas, and the
    engine keeps more tasks open at once than the catalog's concurrency and backlog."""
    # The file's region is another's: each embedded simulator serves the region it is started for.
    settings = {"region": "singapore", "speed": 100, "durations": {"*": 30}, "quotas": RAISED}
    sim_config = _write(tmp_path / "sim.yaml", settings)
    quotas = _write(tmp_path / "quotas.yaml", RAISED)
    job = load_manifest(tmp_path, prompts=numbered(16, "a simulated raised quota"))
    engines = []
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            snapshot = await engines[0].snapshot() if engines else None
            if snapshot:
                peak = max(peak, snapshot["counts"].get("queued", 0))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        report = await wanbatch.run(
            job, out=tmp_path / "run", simulate=True, sim_config=sim_config, quotas=quotas, on_engine=engines.append
        )
    finally:
        watcher.cancel()
    assert report["items"]["saved"] == 16
    assert peak > FLASH.concurrency + engines[0].config.submit.backlog


def test_a_quota_file_sets_the_models_it_names(tmp_path):
    """A model named in the file (by any region's name) takes its quotas, "*" the rest, the catalog what is left."""
    path = tmp_path / "quotas.yaml"
    path.write_text('"*": {concurrency: 3}\nwan2.1-t2i-turbo: {submit_rps: 7.5, concurrency: 9}\n', encoding="utf-8")
    table = load_quotas(path)
    turbo = apply_quotas(catalog.offer("singapore", "wan2.1-t2i-turbo"), table)
    flash = apply_quotas(FLASH, table)
    assert (turbo.submit_rps, turbo.concurrency) == (7.5, 9)
    assert (flash.submit_rps, flash.concurrency) == (FLASH.submit_rps, 3)


def test_a_bad_quota_file_names_file_line_and_field(tmp_path):
    """Every error of a quota file is reported at once, with file:line, the field, what was found and allowed."""
    path = tmp_path / "quotas.yaml"
    path.write_text(
        "wan2.2-t2i-flash:\n  concurrency: 2.5\n  submit_rps: 0\nwan9-t2i: {concurrency: 4}\nwan2.6-t2i: {burst: 3}\n"
        "wanx2.1-t2i-turbo: {concurrency: 4}\nwan2.1-t2i-turbo: {concurrency: 8}\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestInvalid) as raised:
        load_quotas(path)
    text = str(raised.value)
    assert f"{path.as_posix()}:2: wan2.2-t2i-flash.concurrency: found a number (2.5)" in text
    assert f"{path.as_posix()}:3: wan2.2-t2i-flash.submit_rps: found a number (0)" in text
    assert f"{path.as_posix()}:4: wan9-t2i: found an unknown model 'wan9-t2i'" in text
    assert f"{path.as_posix()}:5: wan2.6-t2i.burst: found an unknown quota 'burst'" in text
    assert f"{path.as_posix()}:7: wan2.1-t2i-turbo: found wanx2.1-t2i-turbo a second time" in text


def test_the_cli_refuses_a_bad_quota_file_and_a_sim_config_without_simulate(tmp_path):
    """`--quotas` with a bad file and `--sim-config` without --simulate exit 2 before a run folder is made."""
    bad = tmp_path / "quotas.yaml"
    bad.write_text("wan2.2-t2i-flash: {concurrency: 0}\n", encoding="utf-8")
    out = tmp_path / "run"
    done = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--quotas", str(bad))
    assert done.returncode == 2, done.stderr
    assert "quotas.yaml:1: wan2.2-t2i-flash.concurrency: found a number (0)" in done.stderr
    sim_config = _write(tmp_path / "sim.yaml", {"speed": 600})
    done = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--sim-config", str(sim_config))
    assert done.returncode == 2 and "only for --simulate" in done.stderr
    assert not out.exists()
