"""Figure 6: a manifest of a million items, planned and resumed.

- plan: ``wanbatch plan MANIFEST`` of a 1,000,000-line prompts file; wall
  time and peak RSS of that process (``os.wait4``'s own resource usage);
- first run: ``wanbatch run`` into a new folder, against a simulator
  account whose every create is refused (``Arrearage``), so the run plans
  the million items into its ledger, meets the refusal on its first create
  and ends, leaving a run folder whose ledger holds 1,000,000 planned items;
  its time to that first request is reported too;
- resume: ``wanbatch run`` of the same manifest into that folder with a
  working key, timed from the process's start to the first request the
  simulator receives from it (both on the system's monotonic clock), then
  killed.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .procs import SimServer, child_env, reap, spawn

__all__ = ["measure", "write_manifest"]

REFUSED, WORKING = "bench-refused", "bench-resume"
KEYS = {REFUSED: "sk-bench-refused", WORKING: "sk-bench-resume"}
FIRST_REQUEST_TIMEOUT_S = 600.0


def write_manifest(folder: Path, *, items: int) -> Path:
    """``items`` distinct prompts, one a line, of one image each."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "prompts.txt").open("w", encoding="utf-8") as out:
        for index in range(items):
            out.write(f"scale test subject {index}, studio light\n")
    manifest = {
        "name": "scale",
        "defaults": {"model": "wan2.2-t2i-flash", "size": "1024*1024", "n": 1, "prompt_extend": False},
        "prompts": [{"file": "prompts.txt"}],
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def _until_first_request(sim: SimServer, account: str, child, timeout_s: float) -> float | None:
    """Seconds from ``child``'s start to the first request the simulator saw from ``account``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        first = sim.account(account).get("first_request_mono")
        if first is not None:
            return first - child.started_mono
        if child.proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def measure(workdir: Path, *, items: int, log=print) -> dict[str, Any]:
    manifest = write_manifest(workdir / "job", items=items)
    results: dict[str, Any] = {"items": items}

    plan = reap(spawn([sys.executable, "-m", "wanbatch", "plan", str(manifest)], log_path=workdir / "plan.log"))
    results["plan"] = {"wall_s": plan.wall_s, "max_rss_mb": plan.max_rss_mb, "exit_code": plan.returncode}
    log(f"  plan of {items} items: {plan.wall_s:.2f} s, peak RSS {plan.max_rss_mb:.0f} MB")

    config = {
        "accounts": {
            REFUSED: {"keys": {KEYS[REFUSED]: "beijing"}, "refusal": "Arrearage"},
            WORKING: {"keys": {KEYS[WORKING]: "beijing"}},
        }
    }
    out = workdir / "run"
    run_argv = [sys.executable, "-m", "wanbatch", "-q", "run", str(manifest), "--out", str(out)]
    with SimServer(workdir / "sim", speed=1.0, config=config) as sim:
        argv = [*run_argv, "--base-url", sim.base_url]
        first = spawn(argv, log_path=workdir / "first-run.log", env=child_env(KEYS[REFUSED]))
        first_request_s = _until_first_request(sim, REFUSED, first, FIRST_REQUEST_TIMEOUT_S)
        reap(first, timeout_s=FIRST_REQUEST_TIMEOUT_S)
        results["first_run"] = {
            "to_first_request_s": first_request_s,
            "wall_s": first.wall_s,
            "max_rss_mb": first.max_rss_mb,
            "exit_code": first.returncode,
        }
        log(f"  first run: first request after {_f(first_request_s)} s, ended after {first.wall_s:.1f} s")

        resume = spawn(argv, log_path=workdir / "resume.log", env=child_env(KEYS[WORKING]))
        resume_s = _until_first_request(sim, WORKING, resume, FIRST_REQUEST_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            resume.proc.send_signal(signal.SIGKILL)
        reap(resume, timeout_s=30.0)
        results["resume"] = {"to_first_request_s": resume_s, "max_rss_mb": resume.max_rss_mb}
        log(f"  resume of a {items}-item ledger: first request after {_f(resume_s)} s")
    return results


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
