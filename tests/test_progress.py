"""What a person sees while a run goes: the live display in a terminal, JSON lines elsewhere."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from wanbatch.progress import render

ROOT = Path(__file__).resolve().parent.parent


def test_render_shows_every_stage_rate_eta_and_cost():
    """One frame shows items per stage, images saved, the rate and the cost so far."""
    snapshot = {
        "counts": {"planned": 5, "queued": 3, "generated": 1, "saved": 10, "failed": 1, "rejected": 1},
        "running": 2,
        "images_saved": 40,
        "cost": 5.6,
        "currency": "CNY",
        "elapsed_s": 60.0,
    }
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    for header in ("planned", "submitted", "running", "generated", "saved", "failed", "images", "per min", "cost"):
        assert header in text
    assert "12/21" in text and "5.60 CNY" in text and "40.0" in text and "ETA" in text


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}


def test_json_log_format_is_one_object_per_line(tmp_path):
    """With --log-format json every line on stderr is a JSON object with time, level and event."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wanbatch",
            "--log-format",
            "json",
            "run",
            "jobs/foxes.yaml",
            "--out",
            str(tmp_path / "run"),
            "--simulate",
            "--speed",
            "600",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_clean_env(),
        timeout=120,
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
            sys.executable,
            "-m",
            "wanbatch",
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
        cwd=ROOT,
        env={**_clean_env(), "COLUMNS": "120", "TERM": "xterm"},
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
