"""What a person sees while a run goes: the live display in a terminal, JSON lines elsewhere."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess

from rich.console import Console

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.paths import REPO
from helpers.proc import WANBATCH, cli_env, wanbatch_cli
from wanbatch.outputs.progress import figures, log_progress, progress_line, render

#: A resume 45 s in: 145 of 300 items were done by the runs before, 9 more by this one (36 images).
RESUMED = {
    "counts": {"planned": 140, "queued": 4, "generated": 2, "saved": 150, "failed": 4},
    "running": 2,
    "images_saved": 36,
    "cost": 84.0,
    "currency": "CNY",
    "elapsed_s": 45.0,
    "at_start": {"counts": {"planned": 155, "saved": 141, "failed": 4}, "images_saved": 564, "cost": 78.96},
}


def test_render_shows_every_stage_rate_eta_and_cost():
    """One frame shows items per stage, images saved, the rate and the cost so far."""
    snapshot = {
        "counts": {"planned": 5, "queued": 3, "generated": 1, "saved": 10, "failed": 1, "rejected": 1},
        "running": 2,
        "images_saved": 40,
        "cost": 5.6,
        "currency": "CNY",
        "elapsed_s": 60.0,
        "at_start": {"counts": {}, "images_saved": 0, "cost": 0.0},
    }
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    for header in ("planned", "submitted", "running", "generated", "saved", "failed", "images", "per min", "cost"):
        assert header in text
    assert "12/21" in text and "5.60 CNY" in text and "40.0" in text and "ETA" in text


def test_json_log_format_is_one_object_per_line(tmp_path):
    """With --log-format json every line on stderr is a JSON object with time, level and event."""
    done = wanbatch_cli(
        "--log-format", "json", "run", "jobs/foxes.yaml", "--out", str(tmp_path / "run"), "--simulate", "--speed", "600"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(events) >= 6 and all({"time", "level", "event"} <= e.keys() for e in events)
    assert sum("generated" in e["event"] for e in events) == 2


def test_a_terminal_gets_the_live_display(tmp_path):
    """Run in a pseudo-terminal, the command draws the live display and ends with every item counted."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [
            *WANBATCH,
            "run",
            "jobs/foxes.yaml",
            "--out",
            str(tmp_path / "run"),
            "--simulate",
            "--speed",
            "300",
        ],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=REPO,
        env=cli_env(COLUMNS="120", TERM="xterm"),
    )
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0
    os.close(main)
    text = output.decode("utf-8", "replace")
    assert "planned" in text and "per min" in text and "2/2" in text
    assert "images saved: 2" in text


def test_a_resume_takes_its_eta_and_rates_from_this_run_alone():
    """On a resume the ETA is what is left at this run's pace (9 items in 45 s, 146 left: 12m10s), not at the
    pace of every run's items over this run's time; totals and this run's share are labelled as such."""
    console = Console(record=True, width=140, color_system=None)
    console.print(render(RESUMED))
    text = console.export_text()
    assert "items (all runs)" in text and "154/300" in text and "ETA 12m10s" in text
    all_runs = next(line for line in text.splitlines() if line.startswith("all runs")).split()
    this_run = next(line for line in text.splitlines() if line.startswith("this run")).split()
    assert all_runs[6:9] == ["150", "4", "600"]  # saved, failed, images over every run
    assert this_run[2:5] == ["9", "0", "36"] and this_run[5] == "48.0" and this_run[6] == "5.04"
    line = progress_line(RESUMED)
    assert line == (
        "progress: 154/300 items done, 600 images saved (all runs); this run: 9 items, 36 images in 0m45s,"
        " 48.0 images/min; ETA 12m10s"
    )


async def test_the_engine_reports_what_a_resume_started_from(start_sim, tmp_path, caplog):
    """A resume's snapshots count this run's items and images apart from the earlier run's, and without a
    terminal the same figures come as progress lines."""
    sim = await start_sim(speed=200.0, durations={"*": 4.0})
    manifest = load_manifest(tmp_path, prompts=numbered(6, "a heron"), size="512*512")
    first = await engine_for(sim, tmp_path / "run", budget=3 * 0.14).run(manifest)
    assert first["items"]["saved"] == 3
    engine = engine_for(sim, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="wanbatch"):
        async with log_progress(engine, interval_s=0.01):
            await engine.run(manifest)
    f = figures(await engine.snapshot())
    assert (f.total, f.done, f.done_this_run, f.saved_this_run) == (6, 6, 3, 3)
    assert (f.images, f.images_this_run) == (6, 3) and f.eta_s is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert lines and all("items done" in line and "(all runs); this run: " in line for line in lines)
