"""What a run leaves and says: failures grouped with the message of each state, one manifest per run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wanbatch
from helpers.engine import engine_for
from helpers.paths import REPO
from wanbatch.ledger.runfolder import OtherManifest
from wanbatch.manifest import Manifest
from wanbatch.sim import wire

FAST = {"speed": 200.0, "durations": {"*": 4.0}}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "wanbatch", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


async def test_one_code_in_two_states_keeps_each_states_message(start_sim, tmp_path: Path) -> None:
    """Moderation refusing a prompt (rejected) and an image (failed) report each with its own message."""
    sim = await start_sim(**FAST)
    job = write(
        tmp_path / "job.yaml",
        """\
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts:
          - a calm lake
          - something sim-inappropriate here
          - a sim-unsafe-output scene
        """,
    )
    report = await engine_for(sim, tmp_path / "run").run(Manifest.from_yaml(job))
    group = report["failures"]["DataInspectionFailed"]
    assert group["count"] == 2
    assert group["states"] == {
        "rejected": {"count": 1, "message": wire.INPUT_INSPECTION},
        "failed": {"count": 1, "message": wire.OUTPUT_INSPECTION},
    }
    status = cli("status", str(tmp_path / "run"), cwd=tmp_path)
    assert f"1 rejected DataInspectionFailed: {wire.INPUT_INSPECTION}" in status.stdout
    assert f"1 failed DataInspectionFailed: {wire.OUTPUT_INSPECTION}" in status.stdout


FOXES = """\
name: foxes
defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
prompts: [a red fox]
"""


async def test_another_manifest_is_refused_in_a_filled_folder_unless_forced(tmp_path: Path) -> None:
    """`wanbatch run other.yaml --out DIR` on a folder of another manifest exits 2 sending nothing; --force runs it."""
    out = tmp_path / "run"
    await wanbatch.run(write(tmp_path / "foxes.yaml", FOXES), out=out, simulate=True, speed=600, gallery=False)
    owls = write(tmp_path / "owls.yaml", FOXES.replace("foxes", "owls").replace("a red fox", "a snowy owl"))
    refused = cli("run", str(owls), "--out", str(out), "--simulate", "--no-gallery", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "another manifest" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [json.loads(line)["prompt"] for line in (out / "metadata.jsonl").read_text().splitlines()] == ["a red fox"]
    with pytest.raises(OtherManifest):
        await wanbatch.run(owls, out=out, simulate=True, speed=600, gallery=False)
    forced = cli("run", str(owls), "--out", str(out), "--simulate", "--no-gallery", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


async def test_the_same_manifest_edited_runs_into_its_folder(tmp_path: Path) -> None:
    """An edit of the folder's manifest (same file), or a copy keeping its name:, runs there as before."""
    out = tmp_path / "run"
    foxes = write(tmp_path / "foxes.yaml", FOXES)
    await wanbatch.run(foxes, out=out, simulate=True, speed=600, gallery=False)
    write(foxes, FOXES.replace("[a red fox]", "[a red fox, a fox at dawn]"))
    report = await wanbatch.run(foxes, out=out, simulate=True, speed=600, gallery=False)
    assert report["items"]["saved"] == 2
    renamed = write(tmp_path / "foxes-v2.yaml", FOXES.replace("[a red fox]", "[a fox at dusk]"))
    report = await wanbatch.run(renamed, out=out, simulate=True, speed=600, gallery=False)
    assert report["items"]["saved"] == 3
