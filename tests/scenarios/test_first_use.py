"""The small things a first-time user meets: --version, option checks, the Python API's arguments, JSON log
fields, a tidy run folder, the lock, a closed pipe, and the examples' comments."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import wanbatch
from helpers.paths import REPO
from helpers.proc import WANBATCH, cli_env, wanbatch_cli
from wanbatch import catalog
from wanbatch.errors import ConfigError, RunLocked
from wanbatch.ledger import RunLock
from wanbatch.manifest import Manifest


@pytest.fixture(scope="module")
def json_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The minimal manifest run to its end with JSON log lines: the folder and the finished process."""
    out = tmp_path_factory.mktemp("first-use") / "foxes"
    done = wanbatch_cli(
        "--log-format", "json", "run", "jobs/foxes.yaml", "--out", str(out), "--simulate", "--speed", "600"
    )
    assert done.returncode == 0, done.stderr
    return out, done


def test_version_prints_the_package_version():
    """`wanbatch --version` prints the version of the package and exits 0."""
    done = wanbatch_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wanbatch {wanbatch.__version__}"


def test_make_plan_takes_a_path_as_run_does():
    """`wanbatch.make_plan` takes the manifest's path (str or Path) as `wanbatch.run` does."""
    expected = wanbatch.make_plan(Manifest.from_yaml(REPO / "jobs/foxes.yaml"))
    assert wanbatch.make_plan(str(REPO / "jobs/foxes.yaml")) == expected
    assert wanbatch.make_plan(REPO / "jobs/foxes.yaml") == expected


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [("--speed", "0", "above 0"), ("--speed", "-2", "above 0"), ("--budget", "-5", "0 or more")],
)
def test_speed_and_budget_out_of_range_exit_2(tmp_path, option, value, allowed):
    """`--speed 0` is not quietly taken as 60 and `--budget -5` not accepted: exit 2 naming the option."""
    out = tmp_path / "run"
    done = wanbatch_cli("run", "jobs/foxes.yaml", "--out", str(out), "--simulate", option, value)
    assert done.returncode == 2
    assert f"argument {option}: found {value}; allowed:" in done.stderr and allowed in done.stderr
    assert not out.exists()


async def test_the_python_api_refuses_the_same_values(tmp_path):
    """`wanbatch.run(speed=0)` and `budget=-5` raise ConfigError before a run folder is made."""
    with pytest.raises(ConfigError, match=r"speed 0: .* above 0"):
        await wanbatch.run("jobs/foxes.yaml", out=tmp_path / "run", simulate=True, speed=0)
    with pytest.raises(ConfigError, match=r"budget -5: .* 0 or more"):
        await wanbatch.run("jobs/foxes.yaml", out=tmp_path / "run", simulate=True, budget=-5)
    assert not (tmp_path / "run").exists()


def test_json_log_lines_carry_the_event_and_its_fields(json_run):
    """With --log-format json, a submit and a generation are events with item, task, state as fields, and
    the text a person reads is kept as message."""
    _, done = json_run
    events = [json.loads(line) for line in done.stderr.splitlines()]
    submitted = [e for e in events if e["event"] == "submitted"]
    generated = [e for e in events if e["event"] == "generated"]
    assert len(submitted) == len(generated) == 2
    for event in submitted:
        assert event["state"] == "queued" and event["model"] == "wan2.2-t2i-flash" and event["task"]
        assert event["message"].startswith(f"→ {event['item']} ")
    assert {e["item"] for e in generated} == {e["item"] for e in submitted}
    assert all(e["state"] == "generated" and e["images"] == 1 for e in generated)
    assert all(set(e) >= {"time", "level", "event", "message"} for e in events)


def test_a_finished_run_leaves_no_partial_folder_and_no_lock_file(json_run):
    """After a run ends, neither `images/.partial/` nor `run.lock` is left in the run folder."""
    out, _ = json_run
    assert len(list((out / "images").glob("*.png"))) == 2
    assert not (out / "images" / ".partial").exists()
    assert not (out / "run.lock").exists()


def test_the_lock_still_protects_a_folder_in_use(tmp_path):
    """While a run holds the folder a second one is refused; the file goes with the holder, and the next run
    takes the folder."""
    with RunLock(tmp_path):
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "run.lock").exists()
    with RunLock(tmp_path), pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()


def test_status_into_a_closed_pipe_exits_quietly(json_run):
    """`wanbatch status DIR --json | head` whose reader is gone ends without a traceback, as `cat` would."""
    out, _ = json_run
    proc = subprocess.Popen(
        [*WANBATCH, "status", str(out), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=cli_env(),
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert stderr == ""


def test_the_examples_state_wan26_sizes_as_the_catalog_does():
    """Comments in jobs/*.yaml that give wan2.6's pixel bounds give the catalog's, not another's."""
    rule = catalog.MODELS["wan2.6-t2i"].size_rule
    bounds = {rule.min_pixels, rule.max_pixels}
    claims = []
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            comment = line.partition("#")[2]
            if "wan2.6" in comment and "pixels" in comment:
                sizes = re.findall(r"(\d+)\*(\d+)", comment)
                claims += [(f"{path.name}:{number}", int(w) * int(h)) for w, h in sizes]
    assert len(claims) >= 2
    assert [claim for claim in claims if claim[1] not in bounds] == []
