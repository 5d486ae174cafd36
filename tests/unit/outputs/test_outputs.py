"""What a run leaves and says: failures grouped with the message of each state, one manifest per run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import wanbatch
from helpers.engine import engine_for
from helpers.manifest import write_manifest
from helpers.proc import wanbatch_cli
from wanbatch.manifest import Manifest
from wanbatch.sim import wire
from wanbatch.stages.intake import OtherManifest

FAST = {"speed": 200.0, "durations": {"*": 4.0}}


async def test_one_code_in_two_states_keeps_each_states_message(start_sim, tmp_path: Path) -> None:
    """Moderation refusing a prompt (rejected) and an image (failed) report each with its own message."""
    sim = await start_sim(**FAST)
    job = write_manifest(
        tmp_path,
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
    status = wanbatch_cli("status", str(tmp_path / "run"), cwd=tmp_path)
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
    await wanbatch.run(
        write_manifest(tmp_path, FOXES, file_name="foxes.yaml"), out=out, simulate=True, speed=600, gallery=False
    )
    owls = FOXES.replace("foxes", "owls").replace("a red fox", "a snowy owl")
    owls = write_manifest(tmp_path, owls, file_name="owls.yaml")
    refused = wanbatch_cli("run", str(owls), "--out", str(out), "--simulate", "--no-gallery", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "another manifest" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [json.loads(line)["prompt"] for line in (out / "metadata.jsonl").read_text().splitlines()] == ["a red fox"]
    with pytest.raises(OtherManifest):
        await wanbatch.run(owls, out=out, simulate=True, speed=600, gallery=False)
    forced = wanbatch_cli("run", str(owls), "--out", str(out), "--simulate", "--no-gallery", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


async def test_the_same_manifest_edited_runs_into_its_folder(tmp_path: Path) -> None:
    """An edit of the folder's manifest (same file), or a copy keeping its name:, runs there as before."""
    out = tmp_path / "run"
    foxes = write_manifest(tmp_path, FOXES, file_name="foxes.yaml")
    await wanbatch.run(foxes, out=out, simulate=True, speed=600, gallery=False)
    write_manifest(tmp_path, FOXES.replace("[a red fox]", "[a red fox, a fox at dawn]"), file_name="foxes.yaml")
    report = await wanbatch.run(foxes, out=out, simulate=True, speed=600, gallery=False)
    assert report["items"]["saved"] == 2
    renamed = FOXES.replace("[a red fox]", "[a fox at dusk]")
    renamed = write_manifest(tmp_path, renamed, file_name="foxes-v2.yaml")
    report = await wanbatch.run(renamed, out=out, simulate=True, speed=600, gallery=False)
    assert report["items"]["saved"] == 3
