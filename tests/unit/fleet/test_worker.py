"""A fleet worker run in-process on PostgreSQL: a batch of one worker finishes and writes its outputs, and a
worker started on the batch with another manifest is refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from wanbatch.stages.intake import OtherManifest


async def test_a_worker_with_another_manifest_is_refused_before_anything_is_sent(
    start_sim, pg_url: str, tmp_path: Path
) -> None:
    """No folder holds a fleet's batch, so its manifest record is read from the database: a worker given another
    manifest for the same --out would mix two datasets in one metadata.jsonl, and is refused, sending nothing."""
    sim = await start_sim(speed=100.0, durations={"*": 2.0})
    first = load_manifest(tmp_path / "a", prompts=numbered(2, "a glass heron"), name="herons")
    report = await engine_for(sim, tmp_path / "out", gallery=False, ledger_url=pg_url).run(first)
    assert report["items"]["saved"] == 2 and (tmp_path / "out" / "report.json").exists()
    assert report["fleet"]["last"] is True and report["fleet"]["taken_over"] == 0
    creates = sim.requests["create"]
    other = load_manifest(tmp_path / "b", prompts=numbered(2, "a paper crane"), name="cranes")
    with pytest.raises(OtherManifest, match="another manifest"):
        await engine_for(sim, tmp_path / "out", gallery=False, ledger_url=pg_url).run(other)
    assert sim.requests["create"] == creates
