"""Ctrl-C and SIGTERM sent to a real ``wanbatch run`` process working against a ``wanbatch sim`` process.

The first signal stops submitting at once and lets the run finish what is
already paid for, then exit 130; a second quits at once. Either way the run
folder resumes to the end with nothing paid twice, which the simulator's
billing log proves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import signal
import subprocess
import time

import pytest

from helpers.ledger import count_items
from helpers.manifest import numbered, write_manifest
from helpers.outputs import audit
from helpers.proc import read_billing, start_run, start_sim, wait_until, wanbatch_cli
from wanbatch.engine import Engine, EngineConfig
from wanbatch.manifest import Manifest

SPEED = 50.0
FLASH = ("wan2.2-t2i-flash",)
#: The states of an item whose task may be running, or whose images may still be unsaved.
OPEN = "state IN ('submitting', 'unknown', 'queued', 'generated')"
#: Items whose create has been attempted: the count that must stop growing when submitting stops.
ATTEMPTED = "attempts > 0"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_stops_submitting_saves_what_is_paid_for_and_exits_130(tmp_path, signum):
    """After one SIGINT or SIGTERM no new create goes out, every task already made is followed to its end and its
    images saved, the exit code is 130, and a resume finishes the rest without paying for anything twice."""
    sim = start_sim(tmp_path / "sim", speed=SPEED, config={"durations": {"*": 10.0}})
    manifest = write_manifest(tmp_path, prompts=numbered(12, f"stop by {signum.name}"))
    out = tmp_path / "run"
    try:
        run = start_run(manifest, out, sim=sim)
        wait_until(lambda: count_items(out, "state = 'queued'") >= 2, what="two tasks queued on the service")
        attempted = count_items(out, ATTEMPTED)
        run.signal(signum)
        assert run.wait(60) == 130, run.stderr()[-3000:]
        # A create already on the wire when the signal came may still land; nothing after it.
        assert count_items(out, ATTEMPTED) <= attempted + 2
        assert count_items(out, OPEN) == 0, "the run exited with paid work not saved"
        assert count_items(out, "state = 'saved'") > 0 and count_items(out, "state = 'planned'") > 0
        assert "stopping" in run.stderr()
        assert json.loads((out / "report.json").read_text())["interrupted"] is True
        sim.settle(20.0)
        stopped = audit(out, sim.billing())
        assert stopped.duplicates == [] and stopped.lost == []
        assert set(stopped.items) == {"saved", "planned"}

        resumed = start_run(manifest, out, sim=sim)
        assert resumed.wait(60) == 0, resumed.stderr()[-3000:]
        sim.settle(20.0)
    finally:
        sim.stop()
    result = audit(out, sim.billing())
    assert result.clean and result.billed == result.saved == 12


def test_second_sigint_quits_at_once_and_the_folder_resumes(tmp_path):
    """A second Ctrl-C ends the process at once, tasks still running; the ledger it leaves resumes to the end with
    every billed image saved and nothing paid twice."""
    speed, duration_s = 30.0, 60.0  # two wall seconds a task: "at once" is well under that
    # Every task the engine keeps open runs at once on the service, so the resume takes one task's time.
    config = {"durations": {"*": duration_s}, "quotas": {"*": {"concurrency": "unlimited"}}}
    sim = start_sim(tmp_path / "sim", speed=speed, config=config)
    manifest = write_manifest(tmp_path, prompts=numbered(4, "twice"))
    out = tmp_path / "run"
    try:
        run = start_run(manifest, out, sim=sim)
        # Every create answered first: a quit in the middle of one is the chaos test's subject, not this one's.
        wait_until(lambda: count_items(out, "state = 'queued'") == 4, what="every task made")
        run.signal(signal.SIGINT)
        time.sleep(0.2)
        run.signal(signal.SIGINT)
        signalled = time.monotonic()
        assert run.wait(30) == 130, run.stderr()[-3000:]
        assert time.monotonic() - signalled < duration_s / speed / 2
        assert count_items(out, "state = 'queued'") > 0, "it waited for the tasks instead of quitting"
        assert "resume with" in run.stderr()

        resumed = start_run(manifest, out, sim=sim)
        assert resumed.wait(60) == 0, resumed.stderr()[-3000:]
        sim.settle(duration_s)
    finally:
        sim.stop()
    result = audit(out, sim.billing())
    assert result.clean and result.billed == result.saved == 4


@contextlib.contextmanager
def interrupted_with_backlog(tmp_path, *, count: int, tag: str):
    """A run with --cancel-pending stopped by Ctrl-C (exit 130) once a backlog of its tasks waits PENDING on
    the service (which runs one task at a time); yields (simulator, manifest, run folder), the simulator
    stopped after the block."""
    config = {"durations": {"*": 20.0}, "quotas": {"*": {"concurrency": 1}}}
    sim = start_sim(tmp_path / "sim", speed=SPEED, config=config)
    manifest = write_manifest(tmp_path, prompts=numbered(count, tag))
    out = tmp_path / "run"
    try:
        run = start_run(manifest, out, sim=sim, extra=("--cancel-pending",))
        wait_until(lambda: count_items(out, "state = 'queued'") >= 3, what="a backlog of tasks on the service")
        run.signal(signal.SIGINT)
        assert run.wait(60) == 130, run.stderr()[-3000:]
        yield sim, manifest, out
    finally:
        sim.stop()


def test_cancel_pending_cancels_tasks_waiting_on_the_service(tmp_path):
    """With --cancel-pending, Ctrl-C also cancels the tasks still PENDING on the service: they are never billed,
    their items end canceled, and the running task's images are saved before exit 130."""
    with interrupted_with_backlog(tmp_path, count=8, tag="cancel") as (sim, _, out):
        sim.settle(60.0)  # a task left PENDING by mistake would run and be billed in this time
    result = audit(out, sim.billing())
    assert result.duplicates == [] and result.lost == []
    assert result.items["canceled"] >= 2 and result.items["saved"] >= 1
    assert set(result.items) == {"saved", "canceled", "planned"}
    report = json.loads((out / "report.json").read_text())
    assert report["canceled_on_service"] == result.items["canceled"]


async def test_a_hard_stop_takes_effect_at_once(start_sim, tmp_path):
    """What the second Ctrl-C does to the engine, cancelling its task, ends it at once, every time: no task made
    before the stop is followed to its end and no image saved after it."""
    for attempt in range(5):
        sim = await start_sim(speed=100.0, durations={"*": 30.0})
        manifest = Manifest.from_yaml(
            write_manifest(tmp_path, file_name=f"hard{attempt}.yaml", prompts=numbered(6, "hard"))
        )
        run_dir = tmp_path / f"run{attempt}"
        engine = Engine(
            run_dir=run_dir,
            keys={"beijing": "sk-sim-beijing"},
            config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=sim.clock.speed),
            clock=sim.clock,
        )
        run = asyncio.create_task(engine.run(manifest))
        # Stop right as a task is handed to the tracker, the moment a stage is being woken.
        while count_items(run_dir, "state = 'queued'") < 3:
            await asyncio.sleep(0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        # Tasks take 30 service seconds (0.3 s here): a stop that waited would have seen them end.
        assert count_items(run_dir, "state IN ('generated', 'saved')") == 0, f"attempt {attempt}: it went on"


def test_resume_after_cancel_pending_makes_the_canceled_items(tmp_path):
    """Items whose tasks were canceled while PENDING cost nothing; resuming the run folder makes them, so the
    manifest ends complete (exit 0) with each request paid once."""
    with interrupted_with_backlog(tmp_path, count=5, tag="recancel") as (sim, manifest, out):
        assert count_items(out, "state = 'canceled'") >= 1
        resumed = start_run(manifest, out, sim=sim)
        assert resumed.wait(60) == 0, resumed.stdout()
        sim.settle(60.0)
    result = audit(out, sim.billing())
    assert result.clean and result.billed == result.saved == 5


def test_the_resume_hint_resumes_a_simulated_run_and_the_real_service_is_refused(tmp_path):
    """After Ctrl-C a `--simulate` run prints the exact command that resumes it (--simulate and --speed kept); with
    a key in the environment, a resume without --simulate is refused (exit 2, nothing sent) and the hint's
    command finishes the batch."""
    manifest = write_manifest(tmp_path, prompts=numbered(8, "hint"))
    out = tmp_path / "run"
    run = start_run(manifest, out, extra=("--simulate", "--speed", "50"), key="sk-a-real-looking-key")
    wait_until(lambda: count_items(out, "state = 'queued'") >= 2, what="two tasks queued on the simulator")
    run.signal(signal.SIGINT)
    assert run.wait(60) == 130, run.stderr()[-3000:]
    hint = run.stderr().split("resume with: ", 1)[1].splitlines()[0]
    assert hint == shlex.join(["wanbatch", "run", str(manifest), "--out", str(out), "--simulate", "--speed", "50"])
    planned, attempted = count_items(out, "state = 'planned'"), count_items(out, ATTEMPTED)
    assert planned > 0

    real = start_run(manifest, out, key="sk-a-real-looking-key")
    assert real.wait(60) == 2, real.stderr()[-3000:]
    assert "made against the embedded simulator (--simulate)" in real.stderr()
    assert count_items(out, "state = 'planned'") == planned and count_items(out, ATTEMPTED) == attempted

    resumed = start_run(manifest, out, extra=tuple(shlex.split(hint)[5:]), key="sk-a-real-looking-key")
    assert resumed.wait(60) == 0, resumed.stderr()[-3000:]
    assert count_items(out, "state = 'saved'") == 8


def test_a_simulated_run_killed_hard_resumes_as_a_real_one_would(tmp_path):
    """After kill -9, a `--simulate` resume finds the embedded simulator's tasks, clock and billing in the run
    folder: nothing is written off (TaskExpired, OutcomeUnknown), every item is saved, each image paid once."""
    manifest = write_manifest(tmp_path, prompts=numbered(10, "hard stop"))
    out = tmp_path / "run"
    flags = ("--simulate", "--speed", "50")
    run = start_run(manifest, out, extra=flags)
    wait_until(lambda: count_items(out, "state = 'queued'") >= 2, what="two tasks queued on the simulator")
    run.kill()
    assert count_items(out, OPEN) >= 2  # paid work in flight died with the process

    resumed = start_run(manifest, out, extra=flags)
    assert resumed.wait(120) == 0, resumed.stderr()[-3000:]
    assert count_items(out, "error_code IN ('TaskExpired', 'OutcomeUnknown') OR state = 'expired'") == 0
    billing = read_billing(out / ".sim" / "beijing" / "billing.jsonl")
    result = audit(out, billing)
    assert result.clean and result.billed == result.saved == 10


def cancel(out, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`wanbatch cancel OUT` as a user runs it, with only ``env``'s DASHSCOPE variables."""
    return wanbatch_cli("cancel", str(out), env=env)


def test_cancel_without_a_key_is_refused_and_a_simulated_folder_cancels_on_its_simulator(tmp_path):
    """`wanbatch cancel DIR` without a key refuses a folder of the real service with exit 2 and the variable to
    set (no traceback); on a --simulate folder it needs no key, cancels the PENDING tasks on the folder's own
    simulator, and the folder then resumes to the end with each image paid once."""
    config = {"durations": {"*": 60.0}, "quotas": {"*": {"concurrency": 1}}}
    sim = start_sim(tmp_path / "sim", speed=SPEED, config=config)
    manifest = write_manifest(tmp_path, prompts=numbered(4, "cancel later"))
    try:
        real = start_run(manifest, tmp_path / "real", sim=sim)
        wait_until(lambda: count_items(tmp_path / "real", "state = 'queued'") >= 2, what="tasks on the service")
        real.kill()
        keyless = cancel(tmp_path / "real", {})
        assert keyless.returncode == 2 and "DASHSCOPE_API_KEY" in keyless.stderr, keyless.stderr
        assert "Traceback" not in keyless.stderr
    finally:
        sim.stop()

    out = tmp_path / "simulated"
    run = start_run(manifest, out, extra=("--simulate", "--speed", "10"))
    wait_until(lambda: count_items(out, "state = 'queued'") == 4, what="two tasks running and two waiting")
    run.kill()
    done = cancel(out, {"DASHSCOPE_HTTP_BASE_URL": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("canceled 2; 2 already running"), done.stdout
    assert count_items(out, "state = 'canceled'") == 2
    resumed = start_run(manifest, out, extra=("--simulate", "--speed", "10"))
    assert resumed.wait(120) == 0, resumed.stderr()[-3000:]
    result = audit(out, read_billing(out / ".sim" / "beijing" / "billing.jsonl"))
    assert result.clean and result.billed == result.saved == 4
