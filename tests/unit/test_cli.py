"""The ``wanbatch`` command as a user runs it: a subprocess, its exit codes and what it prints."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from helpers.paths import REPO
from helpers.proc import WANBATCH, cli_env, start_sim, wanbatch_cli


def test_run_simulate_saves_everything_and_exits_0(tmp_path):
    """`run --simulate` on the minimal manifest exits 0 and says where images, metadata and report are."""
    out = tmp_path / "foxes"
    done = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600")
    assert done.returncode == 0, done.stderr
    assert f"report:   {out / 'report.json'}" in done.stdout
    assert len(list((out / "images").glob("*.png"))) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["items"]["saved"] == 2 and report["submitted"] == 2


def test_second_run_of_a_finished_folder_submits_nothing(tmp_path):
    """Running the same manifest into the same folder again does nothing new and still exits 0."""
    out = tmp_path / "foxes"
    assert wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600").returncode == 0
    again = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600")
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["submitted"] == 0 and report["items_existing"] == 2 and report["items"]["saved"] == 2


def test_moderation_rejection_exits_3(tmp_path):
    """A batch that finished with a rejected item exits 3 and names the code in its summary."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        textwrap.dedent("""\
        name: m
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts:
          - a quiet harbour
          - a sim-inappropriate poster
        """)
    )
    done = wanbatch_cli("run", str(manifest), "--out", str(tmp_path / "run"), "--simulate", "--speed", "600")
    assert done.returncode == 3, done.stderr
    assert "1 saved" in done.stdout and "1 rejected" in done.stdout
    assert "DataInspectionFailed" in done.stdout and "m.yaml:5" in done.stdout


def test_invalid_manifest_exits_2_with_file_line_and_field(tmp_path):
    """A bad size is refused before anything runs: exit 2, file:line, field, what was found and what is allowed."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        'name: bad\ndefaults: {model: wan2.2-t2i-flash, n: 1}\nprompts:\n  - prompt: a fox\n    size: "2048*2048"\n'
    )
    done = wanbatch_cli("run", str(manifest), "--out", str(tmp_path / "run"), "--simulate")
    assert done.returncode == 2
    assert "bad.yaml:5" in done.stderr and "size" in done.stderr and "2048*2048" in done.stderr
    assert "[512, 1440]" in done.stderr
    assert not (tmp_path / "run").exists()


def test_missing_key_exits_2_and_says_which_variable(tmp_path):
    """Without a key and without --simulate, run refuses at once and names the variable to set."""
    done = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "DASHSCOPE_API_KEY" in done.stderr


def test_plan_shows_cost_and_quota_time():
    """`plan` prints items, images, cost at list prices and the quota time, and sends nothing."""
    done = wanbatch_cli("plan", "jobs/demo.yaml")
    assert done.returncode == 0, done.stderr
    assert "7 item(s), 28 image(s)" in done.stdout and "total: 4.40 CNY" in done.stdout
    plan = json.loads(wanbatch_cli("plan", "jobs/demo.yaml", "--json").stdout)
    flash = next(lane for lane in plan["lanes"] if lane["model"] == "wan2.2-t2i-flash")
    assert flash["items"] == 3 and flash["images"] == 12 and flash["quota_time_s"] == 3 * 40.0 / 2


def test_status_reads_a_run_folder(tmp_path):
    """`status` reports counts per state of a run folder, as text and as JSON."""
    out = tmp_path / "foxes"
    wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600")
    text = wanbatch_cli("status", str(out))
    assert text.returncode == 0 and "2 saved" in text.stdout
    data = json.loads(wanbatch_cli("status", str(out), "--json").stdout)
    assert data["items"]["saved"] == 2 and data["images"]["saved"] == 2
    missing = wanbatch_cli("status", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "is this a run folder?" in missing.stderr


def test_status_while_a_run_is_going(tmp_path):
    """`status --json` reads a run folder while its run holds the lock and writes to the ledger."""
    import time

    out = tmp_path / "slow"
    proc = subprocess.Popen(
        [*WANBATCH, "run", "jobs/demo.yaml", "--out", str(out), "--simulate", "--speed", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "ledger.sqlite").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        during = json.loads(wanbatch_cli("status", str(out), "--json").stdout)
        assert sum(during["items"].values()) == 7 and during["items"]["saved"] < 7
        assert proc.poll() is None  # still running while it was read
    finally:
        proc.kill()  # a graceful stop would first finish what is paid for: not what this test is about
        proc.wait(timeout=120)


def test_budget_refuses_a_plan_over_it_and_runs_one_under(tmp_path):
    """--budget under the plan's cost exits 2 with nothing sent; a manifest budget over it runs to the end."""
    done = wanbatch_cli(
        "run", "jobs/foxes.yaml", "--out", str(tmp_path / "run"), "--simulate", "--speed", "600", "--budget", "0.2"
    )
    assert done.returncode == 2 and "over the budget of 0.20 CNY" in done.stderr  # the plan (0.28) is refused
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: m\nbudget: 0.30\ndefaults: {model: wan2.2-t2i-flash, size: '512*512', n: 1}\nprompts: [a, b]\n"
    )
    done = wanbatch_cli("run", str(manifest), "--out", str(tmp_path / "run2"), "--simulate", "--speed", "600")
    assert done.returncode == 0, done.stderr  # 0.28 fits in 0.30


def test_export_command_writes_shards_both_formats(tmp_path):
    """`wanbatch export DIR --format webdataset|parquet` writes shards holding every saved image."""
    import tarfile

    import pyarrow.parquet as pq

    out = tmp_path / "foxes"
    assert wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600").returncode == 0
    done = wanbatch_cli("export", str(out), "--format", "webdataset")
    assert done.returncode == 0, done.stderr
    shards = [Path(line) for line in done.stdout.split()]
    with tarfile.open(shards[0]) as tar:
        assert sum(name.endswith(".png") for name in tar.getnames()) == 2
    done = wanbatch_cli("export", str(out), "--format", "parquet", "--out", str(tmp_path / "pq"))
    assert done.returncode == 0, done.stderr
    assert sum(pq.read_table(line).num_rows for line in done.stdout.split()) == 2
    missing = wanbatch_cli("export", str(tmp_path / "nothing"), "--format", "parquet")
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_global_flags_work_after_the_subcommand(tmp_path):
    """-q and --log-format json work after the subcommand too: quiet keeps events off, json makes every line JSON."""
    quiet = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(tmp_path / "q"), "--simulate", "--speed", "600", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "plan:" not in quiet.stderr  # an info event, kept off by -q
    logged = wanbatch_cli(
        "run", "jobs/foxes.yaml", "--out", str(tmp_path / "j"), "--simulate", "--speed", "600", "--log-format", "json"
    )
    assert logged.returncode == 0, logged.stderr
    events = [json.loads(line) for line in logged.stderr.splitlines()]
    assert any(event["message"].startswith("plan:") for event in events)
    before = wanbatch_cli("-v", "status", str(tmp_path / "q"), "-q")
    assert before.returncode == 0 and "2 saved" in before.stdout


def test_a_refused_key_and_an_unreachable_service_exit_4(tmp_path):
    """An invalid key, and a service that cannot be reached, stop every lane with items left planned: exit 4 (not
    3, which a scheduler may take for success), the summary and report.json saying why."""
    sim = start_sim(tmp_path / "sim", speed=600)
    service = ("--base-url", sim.base_url, "--speed", "600")
    try:
        revoked = wanbatch_cli(
            "run", "jobs/foxes.yaml", "--out", str(tmp_path / "key"), *service, env={"DASHSCOPE_API_KEY": "sk-revoked"}
        )
    finally:
        sim.stop()
    assert revoked.returncode == 4, revoked.stderr
    assert "submitting stopped for beijing/wan2.2-t2i-flash: InvalidApiKey" in revoked.stdout
    report = json.loads((tmp_path / "key" / "report.json").read_text())
    assert report["halted"] is True and report["items"]["planned"] == 2
    gone = wanbatch_cli(  # the simulator has stopped: nothing listens on its port any more
        "run", "jobs/foxes.yaml", "--out", str(tmp_path / "net"), *service, env={"DASHSCOPE_API_KEY": "sk-sim-beijing"}
    )
    assert gone.returncode == 4, gone.stderr
    assert "submitting stopped for beijing/wan2.2-t2i-flash: Unreachable" in gone.stdout
